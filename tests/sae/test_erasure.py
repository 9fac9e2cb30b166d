"""The slim erasure artifact (ErasureSAE): encoder + W_dec[T] only; a residual patch holds no full decoder."""
import json

import pytest
import torch

import snce_fast
from snce_fast.ops import reference
from snce_fast.sae.erasure import ERASURE_WEIGHTS, ErasureSAE
from snce_fast.sae.files import SAEFormatError
from snce_fast.testing import clip_text_model, random_sae, write_clip_tokenizer

PROMPTS = ["a photo of the cat on the street", "a painting of a man by the river at night"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tok = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok, clip_text_model(tok, hidden=32, layers=2, seed=4)


def _firing(sae, enc, tok, count=2):
    """Latents that fire on the prompts (so the edit is not a no-op), most frequent first."""
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = enc(ids).last_hidden_state
    _, idx = reference.encode(h[:, 1:], sae)
    return torch.bincount(idx.flatten().long(), minlength=sae.n_latents).argsort(descending=True)[:count].tolist(), ids


def test_slim_roundtrip_keeps_only_target_rows(tmp_path):
    sae = random_sae(32, n=256, k=4, seed=1)
    slim = sae.slim([7, 3])
    slim.save(tmp_path / "e")
    back = ErasureSAE.load(tmp_path / "e")
    assert back.decoder_targets == [3, 7] and back.k == 4  # stored sorted and back.hook == sae.hook
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert torch.equal(back.W_dec_targets, sae.W_dec.detach()[[3, 7]])
    sae.save(tmp_path / "full")
    small, full = (tmp_path / "e" / ERASURE_WEIGHTS).stat().st_size, (tmp_path / "full" / "sae.safetensors").stat().st_size
    assert small < 0.55 * full  # W_dec (as large as W_enc) is gone
    assert json.loads((tmp_path / "e" / "config.json").read_text())["targets"] == [3, 7]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_slim_patch_equals_full_patch_and_holds_no_decoder(clip, monkeypatch, backend_name, request):
    if backend_name == "triton":
        request.getfixturevalue("triton_on_cpu")
    monkeypatch.setenv("SNCE_FAST_BACKEND", backend_name)
    tok, enc = clip
    sae = random_sae(32, n=128, k=3, seed=2)
    targets, ids = _firing(sae, enc, tok)
    with torch.no_grad():
        base = enc(ids).last_hidden_state
        with snce_fast.patched(enc, sae, targets):
            state = enc._snce_fast
            assert state.W_dec is None and tuple(state.W_dec_targets.shape) == (2, 32)  # low-memory state
            full = enc(ids).last_hidden_state
        with snce_fast.patched(enc, sae.slim(targets)):  # neurons default to the stored targets
            slim = enc(ids).last_hidden_state
        with snce_fast.patched(enc, sae.slim([5] + targets), neurons=targets[:1]):  # a subset of the stored rows
            one = enc(ids).last_hidden_state
        with snce_fast.patched(enc, sae, targets[:1]):
            one_full = enc(ids).last_hidden_state
    assert not torch.equal(full, base)
    assert torch.equal(slim, full)
    assert torch.equal(one, one_full)


def test_reconstruct_mode_keeps_the_whole_decoder(clip):
    tok, enc = clip
    sae = random_sae(32, n=128, k=3, seed=2)
    with snce_fast.patched(enc, sae, [1], mode="reconstruct"):
        assert enc._snce_fast.W_dec.shape == (128, 32)


def test_slim_detect_equals_full(clip):
    tok, enc = clip
    sae = random_sae(32, n=128, k=3, seed=2)
    targets, _ = _firing(sae, enc, tok)
    a = snce_fast.detect(enc, sae, targets, PROMPTS, tokenizer=tok)
    b = snce_fast.detect(enc, sae.slim(targets), targets, PROMPTS, tokenizer=tok)
    assert torch.equal(a.flags, b.flags) and torch.equal(a.scores, b.scores)


def test_slim_errors(clip, tmp_path):
    tok, enc = clip
    sae = random_sae(32, n=128, k=3, seed=2)
    slim = sae.slim([4, 9])
    with pytest.raises(ValueError, match="mode 'reconstruct' needs the whole decoder"):
        snce_fast.patch(enc, slim, mode="reconstruct")
    with pytest.raises(ValueError, match="latent 11 has no stored decoder row"):
        snce_fast.patch(enc, slim, [4, 11])
    with pytest.raises(ValueError, match="neurons is required"):
        snce_fast.patch(enc, sae)
    x = torch.randn(5, 32)
    with pytest.raises(ValueError, match="whole decoder"):
        reference.edit(x, slim, [4], mode="reconstruct")
    assert not snce_fast.is_patched(enc)
    # files: a full SAE dir is not an erasure; a truncated weights file loads nothing
    sae.save(tmp_path / "full")
    with pytest.raises(SAEFormatError, match="snce_fast-erasure"):
        ErasureSAE.load(tmp_path / "full")
    slim.save(tmp_path / "e")
    w = tmp_path / "e" / ERASURE_WEIGHTS
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SAEFormatError):
        ErasureSAE.load(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    slim.save(tmp_path / "e2")
    cfg["d_in"] = 31
    (tmp_path / "e2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="W_enc has shape"):
        ErasureSAE.load(tmp_path / "e2")


def test_slim_matches_the_full_sae_hash_and_loads_through_the_cli(tmp_path):
    from snce_fast.cli._common import load_sae
    from snce_fast.sae.fingerprint import sae_hash

    sae = random_sae(32, n=64, k=3, seed=8)
    slim = sae.slim([2])
    assert sae_hash(slim) == sae_hash(sae)  # score files / scans of the full SAE apply to its slim erasure
    other = random_sae(32, n=64, k=3, seed=9)
    assert sae_hash(other) != sae_hash(sae)
    slim.save(tmp_path / "e")
    sae.save(tmp_path / "full")
    assert isinstance(load_sae(str(tmp_path / "e")), ErasureSAE)
    assert isinstance(load_sae(str(tmp_path / "full")), snce_fast.SAE)


def test_erasure_refuses_repeated_targets():
    sae = random_sae(8, n=16, k=2, seed=3)
    with pytest.raises(ValueError, match="repeat a latent"):
        ErasureSAE(sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec.detach()[[3, 3]], [3, 3], 2)


def test_saving_over_the_other_artifact_removes_its_stale_weights(tmp_path):
    sae = random_sae(16, n=64, k=3, seed=5)
    out = tmp_path / "a"
    sae.save(out)
    sae.slim([2, 9]).save(out)  # an erasure over a full SAE
    assert not (out / "sae.safetensors").exists() and (out / ERASURE_WEIGHTS).exists()
    assert ErasureSAE.load(out).decoder_targets == [2, 9]
    sae.save(out)  # and back
    assert not (out / ERASURE_WEIGHTS).exists()
    assert torch.equal(snce_fast.SAE.load(out).W_dec, sae.W_dec)
    sae.save(out)  # saving the same kind again keeps its (new) weights
    assert (out / "sae.safetensors").exists()


def test_saving_into_a_foreign_directory_deletes_nothing(tmp_path):
    """A config.json that is not ours (an HF model, say) says nothing about sae.safetensors there."""
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (out / "sae.safetensors").write_bytes(b"not ours")
    random_sae(16, n=64, k=3, seed=5).slim([1]).save(out)
    assert (out / "sae.safetensors").read_bytes() == b"not ours"
