"""snce_fast.train.loop: train_sae end to end on a tiny encoder, its options, and bad input."""
from __future__ import annotations

import pytest
import torch

import snce_fast
from helpers_train import VOCAB, make_prompts
from snce_fast.sae.model import SAE
from snce_fast.train import train_sae


def test_train_sae_end_to_end(tiny):
    enc, tok = tiny
    sae, rep = train_sae(enc, tok, make_prompts(300), n_latents=64, k=4, batch_size=64, lr=3e-3,
                         warmup_steps=5, shuffle_buffer=256, dead_tokens=300, progress=False, return_report=True)
    assert isinstance(sae, snce_fast.SAE) and sae.d_in == 32 and sae.hook == "output"
    assert rep.steps == len(rep.history) > 10 and rep.tokens == rep.steps * 64
    assert rep.history[-1]["fvu"] < rep.history[0]["fvu"]
    assert rep.fvu < 1.0 and 0 < rep.l0 <= 4 and rep.tokens_per_s > 0
    assert sae.train_report is rep
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_penultimate_clip_and_padding_option(tiny):
    from transformers import CLIPTextConfig, CLIPTextModel

    _, tok = tiny
    cfg = CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=3, bos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    clip = CLIPTextModel(cfg).eval()
    prompts = make_prompts(64)
    _, r = train_sae(clip, tok, prompts, n_latents=32, k=2, batch_size=32, penultimate_output=True,
                     include_padding=True, progress=False, return_report=True)
    assert r.tokens == (64 * 15) // 32 * 32  # every position but BOS, padding included


def _poison(o):
    return (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan")


def test_bad_inputs(tiny):
    enc, tok = tiny
    with pytest.raises(ValueError, match=r"encoder width 32 .*!= SAE d_in 48"):
        train_sae(enc, tok, make_prompts(4), d_in=48, progress=False)
    with pytest.raises(ValueError, match=r"encoder width 32 .*!= SAE d_in 16"):
        train_sae(enc, tok, make_prompts(4), sae=SAE(16, 32, 2), progress=False)
    with pytest.raises(ValueError, match="prompts is empty"):
        train_sae(enc, tok, [], progress=False)
    with pytest.raises(TypeError, match="single str"):
        train_sae(enc, tok, "a cat", progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        train_sae(enc, tok, iter([]), progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size=4096"):
        train_sae(enc, tok, make_prompts(4), n_latents=32, k=2, progress=False)
    with pytest.raises(TypeError, match="prompt 1 .* is a int"):
        train_sae(enc, tok, ["a cat", 7], n_latents=32, k=2, progress=False)
    with pytest.raises(TypeError, match="unknown argument.*'batchsize'"):
        train_sae(enc, tok, make_prompts(4), batchsize=3)
    with pytest.raises(ValueError, match="k=0 is invalid"):
        train_sae(enc, tok, make_prompts(4), n_latents=32, k=0)

    class NaNEncoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config
            self.inner.encoder.layer[0].register_forward_hook(lambda m, i, o: _poison(o))

        def forward(self, **kw):
            return self.inner(**kw)

    from transformers import BertModel

    bad = BertModel(enc.config).eval()
    with pytest.raises(ValueError, match="NaN/inf activations at hook 'output' for prompts 0..3"):
        train_sae(NaNEncoder(bad), tok, make_prompts(4), n_latents=32, k=2, prompt_batch_size=4, progress=False)
