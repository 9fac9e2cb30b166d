"""SAE.from_openai against OpenAI's `sparse_autoencoder` layout and loader semantics (its package is not
on PyPI, so the state dict and the loader's rules are re-stated here from its published model.py):

* `Autoencoder.state_dict()` holds `pre_bias`, `latent_bias`, `encoder.weight [n, d]`, `decoder.weight
  [d, n]`, three statistics buffers, `activation` (the class name) and `activation_state_dict` (TopK's
  `k` and `postact_fn` class name);
* `Autoencoder.from_state_dict` reads a missing `activation` as ReLU and sets `normalize=True` (an input
  layer norm, undone on the reconstruction) for every TopK state dict;
* TopK applies `postact_fn` (ReLU or Identity) to the top-k values.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from snce_fast import SAE, SAEFormatError

N, D, K = 24, 10, 3


def openai_state_dict(postact: str = "ReLU", activation: str = "TopK", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_bias": torch.randn(D, generator=g) * 0.1,
        "latent_bias": torch.randn(N, generator=g) * 0.1,
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N),
        "latents_mean_square": torch.zeros(N),
        "encoder.weight": torch.randn(N, D, generator=g),
        "decoder.weight": torch.randn(D, N, generator=g),
        "activation": activation,
        "activation_state_dict": {"k": K, "postact_fn": postact},
    }


def openai_forward(sd: dict, x: torch.Tensor, normalize: bool, postact: str = "ReLU"):
    """(latents, reconstruction) as OpenAI's Autoencoder computes them."""
    mu = std = None
    if normalize:  # its LN(x): mean-centred, divided by (unbiased std + 1e-5)
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    top = torch.topk(pre, k=K, dim=-1)
    values = top.values.relu() if postact == "ReLU" else top.values
    latents = torch.zeros_like(pre).scatter_(-1, top.indices, values)
    recons = F.linear(latents, sd["decoder.weight"]) + sd["pre_bias"]
    return latents, (recons * std + mu if normalize else recons)


def write(path, sd: dict, config=None):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "state_dict.pth")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_topk_state_dict_is_refused_because_openai_layer_norms_its_input(tmp_path):
    sd = openai_state_dict()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1)) * 3 + 1
    with_ln, _ = openai_forward(sd, x, normalize=True)
    without, _ = openai_forward(sd, x, normalize=False)
    assert not torch.equal(with_ln != 0, without != 0)  # reading it without the norm would be another code
    path = write(tmp_path, sd)
    with pytest.raises(SAEFormatError) as err:
        SAE.from_openai(path)
    msg = str(err.value)
    assert "state_dict.pth" in msg and "activation='TopK'" in msg and "normalize=True" in msg and "\n" not in msg


def test_normalize_false_in_config_matches_the_autoencoder_without_layer_norm(tmp_path):
    sd = openai_state_dict(seed=2)
    path = write(tmp_path, sd, {"normalize": False, "hook": "layer:2", "encoder": "tiny-clip"})
    sae = SAE.from_openai(path)
    assert sae.k == K and sae.hook == "layer:2" and sae.encoder_name == "tiny-clip"
    x = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(3))
    latents, recons = openai_forward(sd, x, normalize=False)
    values, indices = sae.encode(x)
    z = torch.zeros_like(latents).scatter(-1, indices.long(), values)
    torch.testing.assert_close(z, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(values, indices), recons, rtol=1e-5, atol=1e-5)
    assert SAE.from_openai(path, dtype=torch.bfloat16, hook="output").W_dec.dtype == torch.bfloat16


@pytest.mark.parametrize("change, message", [
    (dict(postact="Identity"), r"activation_state_dict\.postact_fn='Identity' is not supported"),
    (dict(activation="ReLU"), r"activation='ReLU' is not supported"),
])
def test_what_snce_fast_cannot_compute_is_refused(tmp_path, change, message):
    path = write(tmp_path, openai_state_dict(**change), {"normalize": False})
    with pytest.raises(SAEFormatError, match=rf"state_dict\.pth: {message}"):
        SAE.from_openai(path)


def test_missing_activation_reads_as_relu_like_openai(tmp_path):
    sd = openai_state_dict()
    del sd["activation"]
    with pytest.raises(SAEFormatError,
                       match=r"activation='ReLU' is not supported \(the state dict has no 'activation'"):
        SAE.from_openai(write(tmp_path, sd, {"normalize": False}))


def test_k_disagreement_and_unknown_entries_are_refused(tmp_path):
    with pytest.raises(SAEFormatError,
                       match=r"config\.json: k=4 differs from the state dict's activation_state_dict\.k=3"):
        SAE.from_openai(write(tmp_path / "a", openai_state_dict(), {"normalize": False, "k": 4}))
    sd = {**openai_state_dict(), "W_skip": torch.zeros(D, D)}
    with pytest.raises(SAEFormatError, match=r"state_dict\.pth has entries \['W_skip'\]"):
        SAE.from_openai(write(tmp_path / "b", sd, {"normalize": False}))


def test_bad_hook_in_config_names_file_and_value(tmp_path):
    with pytest.raises(SAEFormatError, match=r"config\.json: hook='layer-2' is not a hook point"):
        SAE.from_openai(write(tmp_path, openai_state_dict(), {"normalize": False, "hook": "layer-2"}))


def test_guessed_hook_is_logged(tmp_path, caplog):
    path = write(tmp_path, openai_state_dict(), {"normalize": False})
    with caplog.at_level(logging.WARNING, logger="snce_fast"):
        assert SAE.from_openai(path).hook == "output"
    assert any("assuming hook='output'" in r.getMessage() for r in caplog.records)
