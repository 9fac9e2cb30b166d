"""Benchmark: one SAE training step (forward, backward, Adam, decoder renorm) on fixed activations.

Compares, side by side on the same device, data and dtype:
  snce_fast        - `SAETrainer.step` (embedding-bag decode; sparse encoder backward on CPU,
                     dense bf16 encoder backward on CUDA by default)
  snce_fast_dense_enc - the same with encoder_backward="dense" (isolates the encoder backward)
  saelens_eager    - SAELens-style: dense z [M, n] then z @ W_dec (dense decode and backward)
  eleuther_eager   - EleutherAI sparsify-style eager path: embedding_bag decode (sparse
                     decoder backward), dense autograd through encoder + topk
All variants use the same normalised-MSE loss and the unit-norm decoder constraint; AuxK is
off (no latent is dead in a short run). GPU: d 768, n 32768, k 64, 4096 tokens/step, bf16
autocast on the encoder matmul. CPU: a reduced size, and the result file is named *_cpu.json.

    python benchmarks/bench_train.py [--steps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from snce_fast.sae.model import SAE
from snce_fast.train import SAETrainer, TrainConfig

ROOT = Path(__file__).resolve().parent


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


class EagerStep:
    """A baseline step: `dense_decode` selects SAELens-style (dense z @ W_dec) or EleutherAI-style
    (embedding_bag) decoding; the encoder backward is plain autograd (dense) in both."""

    def __init__(self, sae: SAE, lr: float, dense_decode: bool, amp: bool):
        self.sae, self.dense, self.amp = sae, dense_decode, amp
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)

    def step(self, x: torch.Tensor) -> float:
        sae = self.sae
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.float().topk(sae.k, dim=-1, sorted=False)
        vals = top.values.relu()
        if self.dense:
            z = torch.zeros(x.shape[0], sae.n_latents, device=x.device).scatter(1, top.indices, vals)
            x_hat = z @ sae.W_dec + sae.b_dec
        else:
            x_hat = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        self.opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * W).sum(1, keepdim=True) * W)
            self.opt.step()
            W.div_(W.norm(dim=1, keepdim=True))
        return float(loss.detach())


def _time(fn, x: torch.Tensor, steps: int, sync) -> tuple[float, float]:
    fn(x)  # warm-up
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU runs only)")
    ap.add_argument("--d", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--tokens", type=int)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        d, n, k, M = 768, 32768, 64, 4096
        sync = torch.cuda.synchronize
        name = torch.cuda.get_device_name()
    else:
        torch.set_num_threads(args.threads)
        d, n, k, M = 768, 4096, 32, 1024
        sync = lambda: None  # noqa: E731
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    d, n, k, M = args.d or d, args.n or n, args.k or k, args.tokens or M

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(M, d, generator=g) + 0.5).to(dev)
    base = SAE(d, n, k)
    base.reset_parameters(generator=torch.Generator().manual_seed(0))

    def clone() -> SAE:
        s = SAE(d, n, k, init=False).to(dev)
        s.load_state_dict(base.state_dict())
        return s

    lr = 2e-4 / (n / 2**14) ** 0.5
    results = {}
    variants = {
        "snce_fast": lambda: SAETrainer(
            clone(), TrainConfig(n_latents=n, k=k, warmup_steps=1, dead_tokens=10**12)).step,
        "snce_fast_dense_enc": lambda: SAETrainer(
            clone(), TrainConfig(n_latents=n, k=k, warmup_steps=1, dead_tokens=10**12, encoder_backward="dense")).step,
        "saelens_eager": lambda: EagerStep(clone(), lr, dense_decode=True, amp=cuda).step,
        "eleuther_eager": lambda: EagerStep(clone(), lr, dense_decode=False, amp=cuda).step,
    }
    for label, make in variants.items():
        median, best = _time(make(), x, args.steps, sync)
        results[label] = {"step_ms": median * 1e3, "best_ms": best * 1e3, "tokens_per_s": M / median}
        print(f"{label:22s} {median * 1e3:9.2f} ms/step  {M / median:12.0f} tokens/s")
        if cuda:
            torch.cuda.empty_cache()
    for label in results:
        results[label]["speedup_vs_saelens"] = results["saelens_eager"]["step_ms"] / results[label]["step_ms"]
        results[label]["speedup_vs_eleuther"] = results["eleuther_eager"]["step_ms"] / results[label]["step_ms"]

    out = {
        "benchmark": "train_step",
        "device": name,
        "device_type": dev.type,
        "shape": {"d": d, "n_latents": n, "k": k, "tokens_per_step": M},
        "dtype": "bf16 encoder matmul (autocast), fp32 params" if cuda else "fp32",
        "steps_timed": args.steps,
        "results": results,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "commit": _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "" if cuda else "CPU run at reduced size on a shared machine: not a GPU number",
    }
    res = ROOT / "results"
    res.mkdir(exist_ok=True)
    path = res / ("bench_train_gpu.json" if cuda else "bench_train_cpu.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
