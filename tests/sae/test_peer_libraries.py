"""The importers and exporters against the real libraries: SAEs saved by SAELens (`sae-lens`) and
EleutherAI sparsify (`eai-sparsify`, import name `sparsify`) with their own constructors and save
functions load into snce_fast with the same codes and reconstructions as the library's own forward
(float32), and SAEs exported by snce_fast load in those libraries. Install the libraries with
`pip install "snce_fast[peers]"` (the `test` extra includes them); without them these tests skip."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from snce_fast import SAE, SAEFormatError

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed: pip install 'snce_fast[peers]'")
sparsify = pytest.importorskip("sparsify",
                               reason="EleutherAI sparsify is not installed: pip install 'snce_fast[peers]'")

from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

D, N, K = 16, 48, 5
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, 9, D, generator=torch.Generator().manual_seed(seed))


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int = N) -> torch.Tensor:
    out = torch.zeros(*values.shape[:-1], n)
    return out.scatter(-1, indices.long(), values.float())


def _ours(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = sae.encode(x)
    return _dense(values, indices, sae.n_latents), sae.decode(values, indices).float()


@torch.no_grad()
def _randomize(params, seed: int = 0) -> None:
    """Random weights with decoder rows of norms 0.5..2 (so decoder-norm rescaling matters)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))


# -- SAELens ---------------------------------------------------------------------------------------
def saelens_sae(path, seed=0, **cfg):
    meta = cfg.pop("metadata", {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny-clip"})
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=SAEMetadata(**meta), **cfg))
    _randomize([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], seed)
    with torch.no_grad():
        norms = torch.linspace(0.5, 2.0, N)
        unit = sae.W_dec.float() / sae.W_dec.float().norm(dim=1, keepdim=True)
        sae.W_dec.copy_((unit * norms[:, None]).to(sae.W_dec.dtype))
    sae.save_model(path)
    return path


def saelens_forward(path, x):
    theirs = sae_lens.SAE.load_from_disk(path, dtype="float32")
    with torch.no_grad():
        acts = theirs.encode(x)
        return acts, theirs.decode(acts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk_matches_saelens_forward(tmp_path, dtype, apply_b_dec, rescale):
    path = saelens_sae(tmp_path / "sae", dtype=dtype, apply_b_dec_to_input=apply_b_dec,
                       rescale_acts_by_decoder_norm=rescale)
    x = _x()
    acts, recon = saelens_forward(path, x)
    ours = SAE.from_saelens(path, dtype=torch.float32)
    assert ours.hook == "layer:3" and ours.k == K and ours.encoder_name == "tiny-clip"
    z, r = _ours(ours, x)
    assert torch.equal(z != 0, acts != 0)  # the same latents fire
    torch.testing.assert_close(z, acts, **TOL)
    torch.testing.assert_close(r, recon, **TOL)
    assert SAE.from_saelens(path).W_enc.dtype == getattr(torch, dtype)  # by default the config's dtype


@pytest.mark.parametrize("hook_name, hook", [
    ("blocks.3.hook_resid_post", "layer:3"),
    ("blocks.3.hook_resid_pre", "layer:2"),  # the residual stream entering block 3 is block 2's output
    ("text_model.encoder.layers.4", "layer:4"),  # SAELens on a transformers model: a module path
    ("text_model.final_layer_norm", "output"),
])
def test_saelens_hook_names(tmp_path, hook_name, hook):
    path = saelens_sae(tmp_path, metadata={"hook_name": hook_name})
    assert SAE.from_saelens(path).hook == hook


@pytest.mark.parametrize("hook_name, message", [
    ("blocks.0.hook_resid_pre", "embeddings"),
    ("blocks.3.hook_mlp_out", "not a residual-stream tensor"),
    ("blocks.3.hook_attn_out", "not a residual-stream tensor"),
    ("blocks.3.hook_resid_mid", "not a residual-stream tensor"),
    ("text_model.encoder.layers.3.mlp", "not a residual-stream tensor"),
])
def test_saelens_hooks_snce_fast_cannot_patch_are_refused(tmp_path, hook_name, message):
    path = saelens_sae(tmp_path, metadata={"hook_name": hook_name})
    with pytest.raises(SAEFormatError, match=rf"cfg\.json: hook_name={hook_name!r}.*{message}"):
        SAE.from_saelens(path)
    assert SAE.from_saelens(path, hook="layer:1").hook == "layer:1"  # the caller may say where it reads


def test_saelens_hook_z_is_refused(tmp_path):
    path = saelens_sae(tmp_path, reshape_activations="hook_z", metadata={"hook_name": "blocks.3.attn.hook_z"})
    with pytest.raises(SAEFormatError, match=r"cfg\.json: reshape_activations='hook_z' is not supported"):
        SAE.from_saelens(path, hook="layer:3")  # not even with a hook: the SAE reads heads


@pytest.mark.parametrize("norm", ["layer_norm", "expected_average_only_in", "constant_norm_rescale"])
def test_saelens_input_normalisation_is_refused(tmp_path, norm):
    path = saelens_sae(tmp_path, normalize_activations=norm)
    with pytest.raises(SAEFormatError, match=rf"cfg\.json: normalize_activations={norm!r} is not supported"):
        SAE.from_saelens(path)


def test_saelens_jumprelu_refusal_names_the_architecture(tmp_path):
    JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N)).save_model(tmp_path)
    with pytest.raises(SAEFormatError) as err:
        SAE.from_saelens(tmp_path)
    assert "architecture='jumprelu' is not supported" in str(err.value)
    assert "relu'" not in str(err.value).replace("jumprelu'", "")  # no made-up "(activation 'relu')"
    assert str(tmp_path / "cfg.json") in str(err.value) and "\n" not in str(err.value)


def test_saelens_pre_6_config(tmp_path):
    """A SAELens 5.x config: hook_point, activation_fn_str + activation_fn_kwargs.k, boolean
    normalize_activations false. SAELens 6 reads it as a TopK SAE on blocks.5.hook_resid_pre."""
    path = saelens_sae(tmp_path)
    cfg = json.loads((path / "cfg.json").read_text())
    old = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "hook_point": "blocks.5.hook_resid_pre", "hook_point_layer": 5, "hook_point_head_index": None,
           "normalize_activations": False, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "model_name": "tiny-clip", "sae_lens_training_version": "3.5.0"}
    assert cfg["k"] == K
    (path / "cfg.json").write_text(json.dumps(old))
    theirs = sae_lens.SAE.load_from_disk(path)
    assert theirs.cfg.architecture() == "topk" and theirs.cfg.metadata.hook_name == "blocks.5.hook_resid_pre"
    ours = SAE.from_saelens(path)
    assert ours.hook == "layer:4" and ours.k == K
    x = _x(1)
    acts, recon = saelens_forward(path, x)
    z, r = _ours(ours, x)
    torch.testing.assert_close(z, acts, **TOL)
    torch.testing.assert_close(r, recon, **TOL)
    old["normalize_activations"] = True  # SAELens reads it as expected_average_only_in
    (path / "cfg.json").write_text(json.dumps(old))
    with pytest.raises(SAEFormatError, match="normalize_activations='expected_average_only_in'"):
        SAE.from_saelens(path)


def test_saelens_without_hook_name_guesses_output_and_says_so(tmp_path, caplog):
    path = saelens_sae(tmp_path, metadata={"model_name": "x"})
    with caplog.at_level(logging.WARNING, logger="snce_fast"):
        sae = SAE.from_saelens(path)
    assert sae.hook == "output"
    assert any("assuming hook='output'" in r.getMessage() and r.name.startswith("snce_fast") for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snce_fast"):
        assert SAE.from_saelens(path, hook="layer:2", dtype="bfloat16").hook == "layer:2"
    assert not caplog.records


# -- sparsify --------------------------------------------------------------------------------------
def sparsify_sae(path, seed=0, dtype=torch.float32, k=K, **cfg):
    coder = SparseCoder(D, SparseCoderConfig(k=k, num_latents=N, **cfg), dtype=dtype)
    _randomize([coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec], seed)
    coder.save_to_disk(path)
    return path


def sparsify_forward(path, x):
    theirs = SparseCoder.load_from_disk(path).to(torch.float32)
    with torch.no_grad():
        out = theirs.encode(x.reshape(-1, D))
        acts = torch.zeros(out.pre_acts.shape).scatter(-1, out.top_indices, out.top_acts)
        recon = theirs.decode(out.top_acts, out.top_indices)
    return acts.reshape(*x.shape[:-1], N), recon.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multi_topk", [False, True])
def test_sparsify_topk_matches_sparsify_forward(tmp_path, dtype, multi_topk):
    path = sparsify_sae(tmp_path / "text_model.encoder.layers.1", dtype=dtype, multi_topk=multi_topk)
    x = _x(2)
    acts, recon = sparsify_forward(path, x)
    ours = SAE.from_sparsify(path, dtype=torch.float32)
    assert ours.hook == "layer:1" and ours.k == K  # sparsify's hookpoint is the folder name
    z, r = _ours(ours, x)
    assert torch.equal(z != 0, acts != 0)
    torch.testing.assert_close(z, acts, **TOL)
    torch.testing.assert_close(r, recon, **TOL)
    assert SAE.from_sparsify(path).W_enc.dtype == dtype


@pytest.mark.parametrize("folder, hook", [("layers.3/seed1", "layer:3"), ("encoder.layer.2", "layer:2"),
                                          ("h.0", "layer:0"), ("text_model.final_layer_norm", "output")])
def test_sparsify_hookpoint_folders(tmp_path, folder, hook):
    assert SAE.from_sparsify(sparsify_sae(tmp_path / folder)).hook == hook


def test_sparsify_folder_inside_a_block_is_refused(tmp_path):
    path = sparsify_sae(tmp_path / "text_model.encoder.layers.2.mlp")
    with pytest.raises(SAEFormatError, match=r"hookpoint 'text_model.encoder.layers.2.mlp'.*inside an encoder block"):
        SAE.from_sparsify(path)
    assert SAE.from_sparsify(path, hook="layer:2").hook == "layer:2"


def test_sparsify_unknown_folder_guesses_output_and_says_so(tmp_path, caplog):
    path = sparsify_sae(tmp_path / "my_sae")
    with caplog.at_level(logging.WARNING, logger="snce_fast"):
        assert SAE.from_sparsify(path).hook == "output"
    assert any("assuming hook='output'" in r.getMessage() for r in caplog.records)


def test_sparsify_groupmax_is_refused(tmp_path):
    path = sparsify_sae(tmp_path / "layers.1", activation="groupmax", k=4)  # 4 groups of 12 latents
    acts, _ = sparsify_forward(path, _x())
    z, _ = _ours(SAE.from_tensors(*_sparsify_as_topk(path), k=4), _x())
    assert not torch.equal(z != 0, acts != 0)  # read as TopK it would be a different code
    with pytest.raises(SAEFormatError, match=r"cfg\.json: activation='groupmax' is not supported"):
        SAE.from_sparsify(path)


def _sparsify_as_topk(path):
    from safetensors.torch import load_file

    sd = load_file(str(path / "sae.safetensors"))
    return sd["encoder.weight"].t().contiguous(), sd["encoder.bias"], sd["W_dec"], sd["b_dec"]


@pytest.mark.parametrize("flag", ["transcode", "skip_connection"])
def test_sparsify_transcoders_and_skip_connections_are_refused(tmp_path, flag):
    path = sparsify_sae(tmp_path / "layers.1", **{flag: True})
    with pytest.raises(SAEFormatError, match=rf"cfg\.json: {flag}=True is not supported"):
        SAE.from_sparsify(path)


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hook", ["layer:3", "output"])
def test_save_saelens_loads_in_saelens(tmp_path, dtype, hook):
    sae = SAE.random(D, N, K, seed=3, hook=hook).to(dtype)
    sae.encoder_name = "tiny-clip"
    sae.save_saelens(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, TopKSAE) and theirs.W_enc.dtype == dtype
    assert theirs.cfg.metadata.hook_name == ("blocks.3.hook_resid_post" if hook == "layer:3" else None)
    x = _x(4)
    acts, recon = saelens_forward(tmp_path, x)
    z, r = _ours(SAE.from_tensors(*(getattr(sae, n).float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")), k=K), x)
    torch.testing.assert_close(z, acts, **TOL)
    torch.testing.assert_close(r, recon, **TOL)
    back = SAE.from_saelens(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert back.hook == hook and back.encoder_name == "tiny-clip"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_sparsify_loads_in_sparsify(tmp_path, dtype):
    sae = SAE.random(D, N, K, seed=5, hook="layer:-2").to(dtype)
    path = tmp_path / "text_model.encoder.layers.8"
    sae.save_sparsify(path)
    theirs = SparseCoder.load_from_disk(path)
    assert theirs.dtype == dtype and theirs.cfg.k == K and theirs.num_latents == N
    x = _x(5)
    acts, recon = sparsify_forward(path, x)
    z, r = _ours(SAE.from_tensors(*(getattr(sae, n).float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")), k=K), x)
    torch.testing.assert_close(z, acts, **TOL)
    torch.testing.assert_close(r, recon, **TOL)
    back = SAE.from_sparsify(path)  # the exact hook travels in cfg.json, over the folder name
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert back.hook == "layer:-2"


def test_sparsify_import_patches_at_its_hookpoint(tmp_path):
    """The issue's case: sparsify's hookpoint (the folder name) survives the import, so patching with the
    hook the user knows works instead of refusing a mismatched "output"."""
    import snce_fast
    from snce_fast.hooks.points import run_to_hook
    from snce_fast.testing import clip_text_model, write_clip_tokenizer

    tok = write_clip_tokenizer(tmp_path / "tok")
    enc = clip_text_model(tok, hidden=32, layers=3)
    coder = SparseCoder(32, SparseCoderConfig(k=4, num_latents=64))
    _randomize([coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec])
    coder.save_to_disk(tmp_path / "text_model.encoder.layers.1")
    sae = SAE.from_sparsify(tmp_path / "text_model.encoder.layers.1")
    ids = tok(["a photo of a cat"], return_tensors="pt").input_ids
    values, idx = sae.encode(run_to_hook(enc, "layer:1", lambda: enc(ids))[:, 1:])
    assert values[0, 0, 0] > 0
    with torch.no_grad():
        before = enc(ids).last_hidden_state
        with snce_fast.patched(enc, sae, int(idx[0, 0, 0]), hook="layer:1"):
            edited = enc(ids).last_hidden_state
    assert not torch.equal(edited, before) and torch.equal(edited[:, 0], before[:, 0])  # BOS is never edited
