"""Benchmark: SAE training against the real peer libraries, side by side in one process on the same
activations, with the same n, k, batch, learning rate and number of tokens.
Writes results/corpus_train_{cpu,gpu}.json.

  snce_fast   `SAETrainer.step` (this package's training step: embedding-bag decode, sparse encoder
              backward on CPU, unit-norm decoder, Adam)
  sparsify    EleutherAI's `eai-sparsify` SparseCoder: its own forward (fvu), backward,
              `remove_gradient_parallel_to_decoder_directions`, torch Adam, `set_decoder_norm_to_unit_norm`
              (the steps of its Trainer, with Adam as its `optimizer="adam"`)
  saelens     SAELens TopKTrainingSAE: `training_forward_pass`, backward, clip_grad_norm_(1.0), Adam
              (the steps of its SAETrainer._train_step)
Each trains from its own initialisation for the same steps; then tokens/s (median step time) and the
FVU on held-out activations (captions never trained on) are reported. A row is skipped, with the
reason recorded, when its library is not installed (pip install -e ".[test]" installs both).

With --defaults the run also times `snce_fast.train_sae` end to end with every default on 20,000 COCO
captions through MiniLM (encoder passes included) and records its held-out FVU.

    python benchmarks/bench_train_peers.py [--steps 60] [--defaults]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from bench_corpus import coco, setup  # noqa: E402

from snce_fast.hooks.batching import bucketed  # noqa: E402
from snce_fast.hooks.activations import eos_id, hook_activations  # noqa: E402
from snce_fast.sae.model import SAE  # noqa: E402
from snce_fast.train import SAETrainer, TrainConfig, train_sae  # noqa: E402


@torch.no_grad()
def activations(enc, tok, prompts: list[str]) -> torch.Tensor:
    """Counted-token rows [M, d] float32 of `prompts` at the encoder's output."""
    rows = []
    for tb in bucketed(tok, prompts, None, eos_id(enc, tok), 64, 8192):
        h = hook_activations(enc, tb.tokens, "output")
        rows.append(h[tb.counted.to(h.device)].float())
    return torch.cat(rows)


def fvu(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    with torch.no_grad():
        err = sum(float((forward(c) - c).pow(2).sum()) for c in x.split(4096))
    return err / float((x - x.mean(0)).pow(2).sum())


def run_snce(x, held, n, k, batch, steps, lr) -> tuple[list[float], float]:
    cfg = TrainConfig(n_latents=n, k=k, batch_size=batch, lr=lr, warmup_steps=1, progress=False)
    sae = SAE(x.shape[1], n, k, device=x.device)
    sae.reset_parameters(generator=torch.Generator().manual_seed(0))
    tr = SAETrainer(sae, cfg)
    tr.init_b_dec(x[:batch])
    times = []
    for i in range(steps):
        xb = x[(i * batch) % (len(x) - batch):][:batch]
        t0 = time.perf_counter()
        tr.step(xb)
        times.append(time.perf_counter() - t0)
    return times, fvu(sae, held)


def run_sparsify(x, held, n, k, batch, steps, lr) -> tuple[list[float], float]:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k), device=x.device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    times = []
    for i in range(steps):
        xb = x[(i * batch) % (len(x) - batch):][:batch]
        t0 = time.perf_counter()
        out = sae(xb)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        times.append(time.perf_counter() - t0)
    return times, fvu(lambda c: sae(c).sae_out, held)


def run_saelens(x, held, n, k, batch, steps, lr) -> tuple[list[float], float]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k, device=str(x.device),
                                                dtype="float32"))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    dead = torch.zeros(n, dtype=torch.bool, device=x.device)
    times = []
    for i in range(steps):
        xb = x[(i * batch) % (len(x) - batch):][:batch]
        t0 = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    sae.eval()
    return times, fvu(lambda c: sae.decode(sae.encode(c)), held)


def defaults_row(enc, tok) -> dict[str, Any]:
    """`train_sae` with every default on 20,000 COCO captions, end to end."""
    prompts = coco(20000)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae, rep = train_sae(enc, tok, prompts, return_report=True, progress=False)
    wall = time.perf_counter() - t0
    return {"impl": "snce_fast.train_sae defaults", "prompts": len(prompts), "wall_s": wall,
            "steps": rep.steps, "tokens": rep.tokens, "epochs": rep.config["epochs"],
            "warmup_steps": rep.config["warmup_steps"], "train_fvu_last50": rep.fvu,
            "heldout_fvu": rep.heldout_fvu, "heldout_prompts": rep.heldout_prompts,
            "tokens_per_s": rep.tokens_per_s, "warnings": [str(w.message) for w in caught]}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=8000, help="captions whose activations are trained on")
    ap.add_argument("--defaults", action="store_true", help="also time train_sae with defaults on 20,000 captions")
    args = ap.parse_args(argv)
    enc, tok, _, desc = setup(C.ON_GPU)
    n, k, batch = (32768, 64, 4096) if C.ON_GPU else (4096, 32, 4096)
    lr = 2e-4 / (n / 2**14) ** 0.5  # this package's and sparsify's default
    x = activations(enc, tok, coco(args.prompts)).to("cuda" if C.ON_GPU else "cpu")
    held = activations(enc, tok, coco(1000, offset=29000)).to(x.device)
    rows = []
    for impl, fn in (("snce_fast", run_snce), ("sparsify", run_sparsify), ("saelens", run_saelens)):
        try:
            times, f = fn(x, held, n, k, batch, args.steps, lr)
        except ImportError as e:
            rows.append({"impl": impl, "skipped": f"not installed: {e}"})
            continue
        step = statistics.median(times[3:])
        rows.append({"impl": impl, "step_ms": 1e3 * step, "tokens_per_s": batch / step,
                     "heldout_fvu_after": f, "tokens_trained": batch * args.steps})
        print(f"{impl:<10} {1e3 * step:8.1f} ms/step  {batch / step:9.0f} tokens/s  held-out FVU {f:.3f} "
              f"after {batch * args.steps} tokens")
    base = next((r for r in rows if r["impl"] == "snce_fast"), None)
    for r in rows:
        if base is not None and "step_ms" in r:
            r["snce_fast_speedup"] = r["step_ms"] / base["step_ms"]
    if args.defaults:
        rows.append(defaults_row(enc, tok))
        print(rows[-1])
    C.write("corpus_train", rows, {"encoder": desc, "n": n, "k": k, "batch_tokens": batch, "lr": lr,
                                   "steps": args.steps, "train_rows": int(x.shape[0]),
                                   "heldout_rows": int(held.shape[0]), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
