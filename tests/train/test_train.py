"""Tests for snce_fast.train: objective, sparse gradients, data stream, checkpoints, DDP, errors."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

import snce_fast
from snce_fast.sae.model import SAE
from snce_fast.train.trainer import (
    ActivationStream,
    SAETrainer,
    TrainConfig,
    _TopKEncode,
    geometric_median,
    latest_checkpoint,
    sparse_decode,
    train_sae,
)

WORDS = (
    "a photo of the cat dog red blue green car tree house man woman sitting on table with "
    "in street park near big small old young two three riding horse bike water beach"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one intra-op thread avoids spin-wait overhead on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT (d 32) and a BertTokenizer from a written vocab.txt (no downloads)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"), model_max_length=16)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    enc = BertModel(cfg).eval()
    return enc, tok


def make_prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 9, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (L,), generator=g)))
    return out


def synthetic(M: int, d: int = 32, n_true: int = 64, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens that are sparse non-negative combinations of a hidden dictionary, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(M)])
    z = torch.zeros(M, n_true).scatter_(1, idx, torch.rand(M, active, generator=g) * 2 + 0.5)
    return z @ D + 0.3


def small_cfg(**kw) -> TrainConfig:
    base = dict(n_latents=128, k=4, batch_size=64, warmup_steps=5, lr=3e-3, aux_k=16, dead_tokens=500,
                shuffle_buffer=128, prompt_batch_size=8, progress=False)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def new_sae(d: int, cfg: TrainConfig, seed: int = 0) -> SAE:
    sae = SAE(d, cfg.n_latents, cfg.k)
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return sae


# -- objective and gradients -----------------------------------------------------------------
def test_fvu_decreases_and_decoder_rows_unit_norm():
    x = synthetic(4096)
    cfg = small_cfg()
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.init_b_dec(x[:512])
    ms = [tr.step(x[i * 64 : (i + 1) * 64]) for i in range(64)]
    fvus = [m["fvu"] for m in ms]
    assert sum(fvus[-8:]) / 8 < 0.5 * sum(fvus[:4]) / 4, fvus
    assert ms[0]["aux_loss"] == 0 and any(m["aux_loss"] > 0 for m in ms)  # AuxK starts once latents die
    norms = tr.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    m = tr.step(x[:64])
    assert 0 < m["l0"] <= cfg.k and 0.0 <= m["dead_fraction"] <= 1.0


def _dense_loss(x, sae, k, dead, aux_k, aux_coef):
    """Dense autograd reference: z materialised [M, n], decoded with a dense matmul."""
    x_c = x - sae.b_dec
    pre = x_c @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    tv = (x - x.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / tv
    aux = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    za = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu())
    e = (x - x_hat).detach()
    return loss + aux_coef * ((za @ sae.W_dec) - e).pow(2).sum() / e.pow(2).sum()


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_gradients_equal_dense_autograd(sparse):
    torch.manual_seed(0)
    d, n, k, M, aux_k = 16, 64, 4, 40, 8
    sae = SAE(d, n, k)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(M, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    ref = _dense_loss(x, sae, k, dead, aux_k, 1 / 32)
    g_ref = torch.autograd.grad(ref, list(sae.parameters()))

    x_c = x - sae.b_dec
    vals, idx, av, ai = _TopKEncode.apply(x_c, sae.W_enc, sae.b_enc, k, dead, aux_k, None, sparse)
    x_hat = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    e = (x - x_hat).detach()
    loss = loss + (1 / 32) * (sparse_decode(av, ai, sae.W_dec) - e).pow(2).sum() / e.pow(2).sum()
    g = torch.autograd.grad(loss, list(sae.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-5)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], g, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    # the decoder gradient touches only latents that fired (main or aux)
    active = torch.zeros(n, dtype=torch.bool)
    active[torch.cat([idx[vals > 0], ai[av > 0]])] = True
    assert g[2][~active].abs().max() == 0


def test_no_dense_matmul_in_the_autograd_graph():
    """The training graph is the sparse encoder Function + embedding-bag decodes: no mm/addmm node."""
    cfg = small_cfg(dead_tokens=1)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.step(synthetic(64))  # makes latents dead so AuxK runs too
    seen: set[str] = set()
    orig = torch.Tensor.backward

    def spy(loss, *a, **kw):
        stack, visited = [loss.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in visited:
                continue
            visited.add(id(fn))
            seen.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
        return orig(loss, *a, **kw)

    torch.Tensor.backward = spy
    try:
        m = tr.step(synthetic(64, seed=1))
    finally:
        torch.Tensor.backward = orig
    assert m["aux_loss"] > 0
    assert "EmbeddingBagBackward0" in seen and "_TopKEncodeBackward" in seen, seen
    assert not {"MmBackward0", "AddmmBackward0", "BmmBackward0"} & seen, seen


def test_geometric_median_robust_to_outliers():
    x = torch.randn(200, 4) * 0.1 + 1.0
    x[:20] += 100.0
    med = geometric_median(x, iters=30)
    assert (med - 1.0).abs().max() < 0.2
    assert (x.mean(0) - 1.0).abs().max() > 5


# -- the data stream and end-to-end training --------------------------------------------------
def test_stream_counts_tokens_and_bounds_memory(tiny):
    enc, tok = tiny
    prompts = make_prompts(40)
    cfg = small_cfg(batch_size=16, shuffle_buffer=32)
    s = ActivationStream(enc, tok, prompts, cfg, 32, torch.device("cpu"))
    rows = 0
    while (b := s.next_batch()) is not None:
        assert b.shape == (16, 32)
        rows += b.shape[0]
        assert s.buf.shape[0] <= 32 + cfg.prompt_batch_size * 16
    # counted tokens = words + [SEP] per prompt (BOS=[CLS] and padding excluded)
    expected = sum(len(p.split()) + 1 for p in prompts)
    assert s.tokens_in == expected and rows == expected // 16 * 16


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


# -- checkpoints -----------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    enc, tok = tiny
    prompts = make_prompts(200)
    kw = dict(n_latents=64, k=4, batch_size=32, shuffle_buffer=96, lr=3e-3, warmup_steps=4, dead_tokens=100,
              epochs=2, progress=False, seed=3)
    ref = train_sae(enc, tok, prompts, cache_dir=str(tmp_path / "ref_cache"), **kw)

    def crash(m):
        if m["step"] == 23:
            raise Crash()

    ck = tmp_path / "ck"
    with pytest.raises(Crash):
        train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10,
                  cache_dir=str(tmp_path / "cache"), on_step=crash, **kw)
    assert latest_checkpoint(ck).name == "step_000000020"
    out, rep = train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10,
                         cache_dir=str(tmp_path / "cache"), return_report=True, **kw)
    assert rep.resumed_from_step == 20 and rep.steps == ref.train_report.steps
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert [q.name for q in ck.glob("step_*")] == [f"step_{rep.steps:09d}"]  # keep_checkpoints=1
    with pytest.raises(ValueError, match="settings differ.*k: checkpoint 4 vs now 8"):
        train_sae(enc, tok, prompts, checkpoint_dir=str(ck), **{**kw, "k": 8})


def _poison(o):
    return (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan")


# -- bad input -------------------------------------------------------------------------------
def test_bad_inputs(tiny):
    enc, tok = tiny
    with pytest.raises(ValueError, match=r"encoder width 32 .*!= SAE d_in 48"):
        train_sae(enc, tok, make_prompts(4), d_in=48, progress=False)
    with pytest.raises(ValueError, match=r"encoder width 32 .*!= SAE d_in 16"):
        train_sae(enc, tok, make_prompts(4), sae=SAE(16, 32, 2), progress=False)
    with pytest.raises(ValueError, match="prompts is empty"):
        train_sae(enc, tok, [], progress=False)
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


# -- data parallel ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        # (a) step-level: each rank takes half of every global batch
        x = synthetic(64 * 12, seed=1)
        cfg = small_cfg(dead_tokens=128)
        tr = SAETrainer(new_sae(32, cfg), cfg)
        with torch.no_grad():
            tr.sae.b_dec.copy_(x.mean(0))
        for i in range(12):
            xb = x[i * 64 : (i + 1) * 64]
            tr.step(xb[rank * 32 : (rank + 1) * 32])
        # (b) end to end through the encoder, prompts sharded by rank
        from transformers import BertConfig, BertModel, BertTokenizer

        vocab = Path(out) / "vocab.txt"
        tok = BertTokenizer(str(vocab), model_max_length=16)
        torch.manual_seed(0)
        enc = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)).eval()
        sae, rep = train_sae(enc, tok, make_prompts(160), n_latents=64, k=4, batch_size=32, shuffle_buffer=64,
                             lr=3e-3, warmup_steps=3, progress=False, return_report=True,
                             checkpoint_dir=str(Path(out) / "ck"), checkpoint_every=5)
        torch.save({"step": {k: v.detach() for k, v in tr.sae.state_dict().items()},
                    "e2e": {k: v.detach() for k, v in sae.state_dict().items()},
                    "fvu0": rep.history[0]["fvu"], "fvu1": rep.fvu, "steps": rep.steps},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # single process on the concatenated batches
    x = synthetic(64 * 12, seed=1)
    cfg = small_cfg(dead_tokens=128)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    with torch.no_grad():
        tr.sae.b_dec.copy_(x.mean(0))
    for i in range(12):
        tr.step(x[i * 64 : (i + 1) * 64])
    for name, p in tr.sae.state_dict().items():
        assert torch.equal(r0["step"][name], r1["step"][name]), name
        assert torch.allclose(r0["step"][name], p, atol=2e-5, rtol=1e-4), name
    for name in r0["e2e"]:
        assert torch.equal(r0["e2e"][name], r1["e2e"][name]), name
    assert r0["steps"] == r1["steps"] > 3 and r0["fvu1"] < r0["fvu0"]
    ck = latest_checkpoint(tmp_path / "ck")
    assert {p.name for p in ck.iterdir()} >= {"sae", "trainer.pt", "data_rank0.pt", "data_rank1.pt"}


@pytest.mark.parametrize("encoder_backward", ["sparse", "dense"])
def test_bf16_autocast_path_trains(encoder_backward):
    """The CUDA configuration (bf16 encoder matmul) exercised on CPU autocast."""
    x = synthetic(2048)
    cfg = small_cfg(amp=True, encoder_backward=encoder_backward, dead_tokens=100)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.init_b_dec(x[:256])
    ms = [tr.step(x[i * 64 : (i + 1) * 64]) for i in range(32)]
    assert ms[-1]["fvu"] < 0.6 * ms[0]["fvu"] and ms[-1]["aux_loss"] > 0
    assert all(p.dtype == torch.float32 for p in tr.sae.parameters())
