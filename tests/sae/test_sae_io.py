"""SAE files: native round trip, importers, and every bad-input case (nothing half-loaded)."""
import json

import pytest
import torch
from safetensors.torch import save_file

import snce_fast
from snce_fast import SAE, SAEFormatError
from snce_fast.ops import reference
from snce_fast.testing import random_sae


def assert_same(a: SAE, b: SAE):
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.k == b.k and a.hook == b.hook


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    sae = random_sae(16, 40, 3, hook="layer:2").to(dtype)
    sae.encoder_name = "tiny-clip"
    sae.save(tmp_path / "sae")
    back = SAE.load(tmp_path / "sae")
    assert_same(sae, back)
    assert back.W_enc.dtype == dtype and back.encoder_name == "tiny-clip"
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert cfg["d_in"] == 16 and cfg["n_latents"] == 40 and cfg["hook"] == "layer:2"
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "sae.safetensors"]


def test_save_overwrites_atomically(tmp_path):
    random_sae(8, 10, 2, seed=0).save(tmp_path)
    second = random_sae(8, 10, 2, seed=1)
    second.save(tmp_path)
    assert_same(SAE.load(tmp_path), second)


@pytest.fixture
def saved(tmp_path):
    random_sae(8, 12, 2).save(tmp_path)
    return tmp_path


def test_truncated_weights(saved):
    f = saved / "sae.safetensors"
    f.write_bytes(f.read_bytes()[:-17])
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        SAE.load(saved)


def test_missing_key_and_extra_key(saved):
    good = {k: getattr(random_sae(8, 12, 2), k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file({k: v for k, v in good.items() if k != "b_dec"}, str(saved / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match="missing tensor.*b_dec"):
        SAE.load(saved)
    save_file({**good, "W_skip": torch.zeros(2)}, str(saved / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match="unexpected tensor.*W_skip"):
        SAE.load(saved)


def test_wrong_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_latents"] = 13
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(8, 12\), expected \(8, 13\)"):
        SAE.load(saved)


def test_wrong_dtype(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="dtype torch.float32, but .* says torch.bfloat16"):
        SAE.load(saved)
    cfg["dtype"] = "int8"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="int8"):
        SAE.load(saved)


def test_bad_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        SAE.load(saved)
    (saved / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(SAEFormatError, match="format_version 99"):
        SAE.load(saved)
    (saved / "config.json").write_text(json.dumps({"format_version": 1, "d_in": 8}))
    with pytest.raises(SAEFormatError, match="'n_latents'"):
        SAE.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SAE.load(saved)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SAE.load(saved / "nowhere")


def test_bad_k_in_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["k"] = 100
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k=100"):
        SAE.load(saved)


# -- SAELens --------------------------------------------------------------------------------
def saelens_encode(x, w, cfg):
    """SAELens TopK forward, written from its documented semantics."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * norms
    top = pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    if cfg.get("rescale_acts_by_decoder_norm"):
        acts = acts / norms
    return acts @ w["W_dec"] + w["b_dec"], top.indices


def write_saelens(path, d=12, n=30, k=4, **cfg_extra):
    g = torch.Generator().manual_seed(3)
    w = {
        "W_enc": torch.randn(d, n, generator=g),
        "b_enc": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, d, generator=g),
        "b_dec": torch.randn(d, generator=g) * 0.1,
    }
    cfg = {"architecture": "topk", "d_in": d, "d_sae": n, "k": k, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.8.hook_resid_post"}, **cfg_extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))
    return w, cfg


@pytest.mark.parametrize("apply_b_dec, rescale", [(True, False), (False, False), (True, True), (False, True)])
def test_from_saelens_matches_saelens_forward(tmp_path, apply_b_dec, rescale):
    w, cfg = write_saelens(tmp_path, apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale)
    sae = SAE.from_saelens(tmp_path)
    assert sae.hook == "layer:8" and sae.k == 4
    x = torch.randn(9, 12)
    expected, idx = saelens_encode(x, w, cfg)
    v, i = reference.encode(x, sae)
    assert torch.equal(i.long().sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(reference.decode(v, i, sae), expected, rtol=1e-4, atol=1e-4)


def test_from_saelens_old_style_activation_fn(tmp_path):
    write_saelens(tmp_path, architecture="standard", activation_fn="topk", activation_fn_kwargs={"k": 4}, k=None)
    assert SAE.from_saelens(tmp_path).k == 4


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"architecture": "jumprelu"}, "jumprelu"),
        ({"architecture": "batchtopk"}, "batchtopk"),
        ({"architecture": "standard"}, "TopK SAEs only"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ],
)
def test_from_saelens_rejects_unsupported(tmp_path, extra, match):
    write_saelens(tmp_path, **extra)
    with pytest.raises(SAEFormatError, match=match):
        SAE.from_saelens(tmp_path)


def test_from_saelens_checks_shapes(tmp_path):
    write_saelens(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 31
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="W_enc has shape"):
        SAE.from_saelens(tmp_path)


# -- sparsify -------------------------------------------------------------------------------
def write_sparsify(path, d=12, n=36, k=5, **cfg_extra):
    g = torch.Generator().manual_seed(4)
    w = {
        "encoder.weight": torch.randn(n, d, generator=g),
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, d, generator=g),
        "b_dec": torch.randn(d, generator=g) * 0.1,
    }
    cfg = {"expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": k, "multi_topk": False,
           "skip_connection": False, "d_in": d, **cfg_extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae.safetensors"))
    return w


def test_from_sparsify_matches_relu_then_topk(tmp_path):
    w = write_sparsify(tmp_path)  # num_latents 0 -> expansion_factor * d_in = 36
    sae = SAE.from_sparsify(tmp_path)
    assert sae.n_latents == 36
    x = torch.randn(10, 12)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(5)
    v, i = reference.encode(x, sae)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(reference.decode(v, i, sae), expected, rtol=1e-4, atol=1e-4)


def test_from_sparsify_rejects_skip_connection(tmp_path):
    write_sparsify(tmp_path, skip_connection=True)
    with pytest.raises(SAEFormatError, match="skip_connection"):
        SAE.from_sparsify(tmp_path)


# -- OpenAI-style -----------------------------------------------------------------------------
def test_from_openai(tmp_path):
    g = torch.Generator().manual_seed(5)
    n, d = 20, 8
    sd = {"encoder.weight": torch.randn(n, d, generator=g), "decoder.weight": torch.randn(d, n, generator=g),
          "pre_bias": torch.randn(d, generator=g), "latent_bias": torch.randn(n, generator=g),
          "activation": "TopK", "activation_state_dict": {"k": 3}}
    torch.save(sd, tmp_path / "state_dict.pth")
    with pytest.raises(SAEFormatError, match="input layer norm"):  # OpenAI's loader layer-norms every TopK input
        SAE.from_openai(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"normalize": False}))
    sae = SAE.from_openai(tmp_path)
    x = torch.randn(4, d)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    top = pre.topk(3)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae(x), z @ sd["decoder.weight"].T + sd["pre_bias"], rtol=1e-4, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_from_openai_never_unpickles_objects(tmp_path):
    torch.save({"encoder.weight": _Evil()}, tmp_path / "state_dict.pth")
    with pytest.raises(SAEFormatError, match="weights_only=True"):
        SAE.from_openai(tmp_path)


def test_from_tensors_checks_shapes():
    with pytest.raises(ValueError, match=r"W_dec has shape \(5, 4\): expected \(6, 4\)"):
        SAE.from_tensors(torch.zeros(4, 6), torch.zeros(6), torch.zeros(5, 4), torch.zeros(4), k=2)
    with pytest.raises(ValueError, match="dtype"):
        SAE.from_tensors(torch.zeros(4, 6), torch.zeros(6, dtype=torch.float16), torch.zeros(6, 4), torch.zeros(4), k=2)


def test_public_names_exist():
    for name in ("SAE", "reference", "patch", "unpatch", "is_patched", "patched", "detect"):
        assert hasattr(snce_fast, name), name
