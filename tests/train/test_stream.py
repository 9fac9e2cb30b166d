"""snce_fast.train.stream: counted tokens, bounded memory, one-shot prompts, the activation cache."""
from __future__ import annotations

import pytest
import torch

from helpers_train import make_prompts, small_cfg
from snce_fast.train import ActivationStream, train_sae


def test_stream_counts_tokens_and_bounds_memory(tiny):
    enc, tok = tiny
    prompts = make_prompts(40)
    cfg = small_cfg(batch_size=16, shuffle_buffer=32)
    s = ActivationStream(enc, tok, prompts, cfg, 32, torch.device("cpu"))
    rows = 0
    while (b := s.next_batch()) is not None:
        assert b.shape == (16, 32)
        rows += b.shape[0]
        assert s.buf.shape[0] <= 32 + cfg.prompt_window * 16
    # counted tokens = words + [SEP] per prompt (BOS=[CLS] and padding excluded)
    expected = sum(len(p.split()) + 1 for p in prompts)
    assert s.tokens_in == expected and rows == expected // 16 * 16


def test_generator_prompts_and_epochs_with_cache(tiny, tmp_path):
    enc, tok = tiny
    prompts = make_prompts(120)
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_sae(enc, tok, iter(prompts), n_latents=64, k=4, epochs=2, batch_size=32, progress=False)
    _, r1 = train_sae(enc, tok, iter(prompts), n_latents=64, k=4, batch_size=32, shuffle_buffer=64,
                      progress=False, return_report=True)
    _, r2 = train_sae(enc, tok, (p for p in prompts), n_latents=64, k=4, batch_size=32, shuffle_buffer=64,
                      epochs=3, cache_dir=str(tmp_path / "cache"), cache_block=50, progress=False,
                      return_report=True)
    n_tok = sum(len(p.split()) + 1 for p in prompts)
    assert (tmp_path / "cache" / "activations_rank0.f32").stat().st_size == n_tok * 32 * 4
    assert r1.steps == n_tok // 32 and r2.steps == (3 * n_tok) // 32


def test_state_dict_resumes_the_same_batches(tiny):
    enc, tok = tiny
    prompts = make_prompts(60)
    cfg = small_cfg(batch_size=16, shuffle_buffer=32)
    a = ActivationStream(enc, tok, prompts, cfg, 32, torch.device("cpu"))
    for _ in range(3):
        a.next_batch()
    b = ActivationStream(enc, tok, prompts, cfg, 32, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    while (xa := a.next_batch()) is not None:
        assert torch.equal(xa, b.next_batch())
    assert b.next_batch() is None
