"""SAE weights and configs that would load into silently wrong results: NaN/inf tensors and
non-integer config fields are refused, naming the file, the tensor or key, and the bad value."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from snce_fast import SAE, SAEFormatError
from snce_fast.sae import ErasureSAE
from snce_fast.testing import random_sae


def _poison(t: torch.Tensor, count: int, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:count] = value
    return t


def _rewrite(file, name, count, value=float("nan")):
    sd = load_file(str(file))
    sd[name] = _poison(sd[name], count, value)
    save_file(sd, str(file))


# -- NaN / inf weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, count, value", [("b_enc", 3, float("nan")), ("W_dec", 1, float("inf")),
                                                ("W_enc", 2, float("-inf")), ("b_dec", 1, float("nan"))])
def test_native_load_refuses_nonfinite(tmp_path, dtype, name, count, value):
    random_sae(8, 12, 2).to(dtype).save(tmp_path)
    _rewrite(tmp_path / "sae.safetensors", name, count, value)
    with pytest.raises(SAEFormatError, match=rf"sae\.safetensors: {name} has {count} NaN/inf values"):
        SAE.load(tmp_path)


def test_erasure_load_refuses_nonfinite(tmp_path):
    random_sae(8, 12, 2).slim([1, 4]).save(tmp_path)
    _rewrite(tmp_path / "erasure.safetensors", "W_dec_targets", 2, float("inf"))
    with pytest.raises(SAEFormatError, match=r"erasure\.safetensors: W_dec_targets has 2 NaN/inf values"):
        ErasureSAE.load(tmp_path)


def test_from_tensors_and_slim_refuse_nonfinite():
    w = {k: getattr(random_sae(4, 6, 2), k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with pytest.raises(ValueError, match="b_enc has 3 NaN/inf values"):
        SAE.from_tensors(w["W_enc"], _poison(w["b_enc"], 3), w["W_dec"], w["b_dec"], k=2)
    sae = random_sae(4, 6, 2)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")  # edited in memory
    with pytest.raises(ValueError, match="W_enc has 1 NaN/inf values"):
        sae.slim([1])


def _saelens(path, poison=None, **cfg_extra):
    g = torch.Generator().manual_seed(3)
    d, n = 12, 30
    w = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g),
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if poison:
        w[poison] = _poison(w[poison], 2)
    cfg = {"architecture": "topk", "d_in": d, "d_sae": n, "k": 4, "normalize_activations": "none", **cfg_extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))


def _sparsify(path, poison=None, **cfg_extra):
    g = torch.Generator().manual_seed(4)
    d, n = 12, 36
    w = {"encoder.weight": torch.randn(n, d, generator=g), "encoder.bias": torch.randn(n, generator=g),
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if poison:
        w[poison] = _poison(w[poison], 2)
    cfg = {"expansion_factor": 3, "num_latents": 0, "k": 5, "d_in": d, **cfg_extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae.safetensors"))


def _openai(path, poison=None, **cfg):
    g = torch.Generator().manual_seed(5)
    n, d = 20, 8
    sd = {"encoder.weight": torch.randn(n, d, generator=g), "decoder.weight": torch.randn(d, n, generator=g),
          "pre_bias": torch.randn(d, generator=g), "latent_bias": torch.randn(n, generator=g),
          "activation": "TopK", "activation_state_dict": {"k": 3}}
    if poison:
        sd[poison] = _poison(sd[poison], 2)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "state_dict.pth")
    (path / "config.json").write_text(json.dumps({"normalize": False, **cfg}))


@pytest.mark.parametrize("write, load, file, tensor", [
    (_saelens, SAE.from_saelens, "sae_weights.safetensors", "b_dec"),
    (_saelens, SAE.from_saelens, "sae_weights.safetensors", "W_dec"),
    (_sparsify, SAE.from_sparsify, "sae.safetensors", "encoder.bias"),
    (_openai, SAE.from_openai, "state_dict.pth", "latent_bias"),
    (_openai, SAE.from_openai, "state_dict.pth", "decoder.weight"),
])
def test_importers_refuse_nonfinite(tmp_path, write, load, file, tensor):
    write(tmp_path)
    load(tmp_path)  # the clean file loads
    write(tmp_path, poison=tensor)
    with pytest.raises(SAEFormatError, match=rf"{re.escape(file)}: {re.escape(tensor)} has 2 NaN/inf values"):
        load(tmp_path)


# -- integer config fields -------------------------------------------------------------------------
BAD_INTS = [8.7, "abc", "8", [8], None, True]


def _set(file, key, value, sub=None):
    cfg = json.loads(file.read_text())
    (cfg[sub] if sub else cfg)[key] = value
    file.write_text(json.dumps(cfg))


def _bad(value, key):
    """The message's `key=value` part, as a regex."""
    return re.escape(f"{key}={value!r}") + ".*not an integer"


@pytest.mark.parametrize("key", ["d_in", "n_latents", "k", "format_version"])
@pytest.mark.parametrize("bad", BAD_INTS)
def test_native_config_ints(tmp_path, key, bad):
    random_sae(8, 12, 2).save(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())[key]
    if isinstance(bad, float):
        bad = good + 0.7  # used to be truncated to the right number, silently
    _set(tmp_path / "config.json", key, bad)
    with pytest.raises(SAEFormatError, match=r"config\.json: " + _bad(bad, key)):
        SAE.load(tmp_path)
    _set(tmp_path / "config.json", key, float(good))  # 8.0 is a whole number: accepted
    assert SAE.load(tmp_path).n_latents == 12


@pytest.mark.parametrize("key", ["d_in", "n_latents", "k", "format_version"])
@pytest.mark.parametrize("bad", BAD_INTS)
def test_erasure_config_ints(tmp_path, key, bad):
    random_sae(8, 12, 2).slim([1, 4]).save(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())[key]
    if isinstance(bad, float):
        bad = good + 0.7
    if key == "format_version" and bad is None:
        bad = "1"  # a missing / null version reads as 0 (older than any)
    _set(tmp_path / "config.json", key, bad)
    with pytest.raises(SAEFormatError, match=r"config\.json: " + _bad(bad, key)):
        ErasureSAE.load(tmp_path)


@pytest.mark.parametrize("targets, key", [([1, 4.5], "targets[1]"), ([1, "4"], "targets[1]"), ([True, 4], "targets[0]"),
                                          ([[1], 4], "targets[0]")])
def test_erasure_targets_are_ints(tmp_path, targets, key):
    random_sae(8, 12, 2).slim([1, 4]).save(tmp_path)
    _set(tmp_path / "config.json", "targets", targets)
    with pytest.raises(SAEFormatError, match=r"config\.json: " + _bad(targets[int(key[-2])], key)):
        ErasureSAE.load(tmp_path)
    _set(tmp_path / "config.json", "targets", "14")  # a str is not a list (it used to read as [1, 4])
    with pytest.raises(SAEFormatError, match="targets='14' is not a list"):
        ErasureSAE.load(tmp_path)
    _set(tmp_path / "config.json", "targets", [1.0, 4])
    assert ErasureSAE.load(tmp_path).decoder_targets == [1, 4]


@pytest.mark.parametrize("write, load, key, sub", [
    (_saelens, SAE.from_saelens, "d_in", None), (_saelens, SAE.from_saelens, "d_sae", None),
    (_saelens, SAE.from_saelens, "k", None),
    (_sparsify, SAE.from_sparsify, "k", None), (_sparsify, SAE.from_sparsify, "d_in", None),
    (_sparsify, SAE.from_sparsify, "num_latents", None), (_sparsify, SAE.from_sparsify, "expansion_factor", None),
])
@pytest.mark.parametrize("bad", [3.5, "abc", [8], True])
def test_foreign_cfg_ints(tmp_path, write, load, key, sub, bad):
    write(tmp_path)
    _set(tmp_path / "cfg.json", key, bad)
    with pytest.raises(SAEFormatError, match=r"cfg\.json: " + _bad(bad, key)):
        load(tmp_path)


def test_saelens_old_style_k_and_openai_k(tmp_path):
    _saelens(tmp_path / "a", architecture="standard", activation_fn="topk", activation_fn_kwargs={"k": 4.5}, k=None)
    with pytest.raises(SAEFormatError, match=r"activation_fn_kwargs.*k=4\.5.*not an integer"):
        SAE.from_saelens(tmp_path / "a")
    _openai(tmp_path / "b", k=3.5)
    with pytest.raises(SAEFormatError, match=r"config\.json: k=3\.5 .*not an integer"):
        SAE.from_openai(tmp_path / "b")
    _openai(tmp_path / "c", k=3.0)
    assert SAE.from_openai(tmp_path / "c").k == 3


def test_require_int():
    from snce_fast.sae.files import require_int

    cfg = {"a": 8, "b": 8.0, "c": 8.5, "n": None, "t": True, "x": float("nan")}
    assert require_int(cfg, "a", "f.json") == 8 and require_int(cfg, "b", "f.json") == 8
    assert require_int(cfg, "n", "f.json", 0) == 0 and require_int(cfg, "missing", "f.json", None) is None
    for key in ("c", "n", "t", "x"):
        with pytest.raises(SAEFormatError, match=rf"f\.json: {key}=.* is not an integer"):
            require_int(cfg, key, "f.json")
    with pytest.raises(SAEFormatError, match="f.json has no 'missing' entry"):
        require_int(cfg, "missing", "f.json")


# -- neurons given as a str -------------------------------------------------------------------------
def test_slim_refuses_neurons_as_str():
    sae = random_sae(8, 600, 2)
    with pytest.raises(TypeError, match="neurons must be an int or a list of ints, got str '552'"):
        sae.slim("552")
