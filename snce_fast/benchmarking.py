"""Microbenchmarks shipped with the package (`snce-fast bench`), and the timing loop the
scripts under benchmarks/ share.

Each case times what `snce_fast` runs on this device (the backend's automatic choice) against
the eager PyTorch reference on the same inputs. On CUDA: docs/performance.md shapes, bf16, CUDA
events. On CPU: reduced shapes, fp32, wall clock; those are CPU numbers and say nothing about
GPU speed (the fused encode/edit kernels are GPU kernels; on the CPU the package runs the
reference for them, and the C++ extension for decode and the histograms).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from snce_fast.ops import backend, histogram, reference
from snce_fast.records.run_info import device_name, metadata
from snce_fast.sae.model import SAE

# dense bf16 peak FLOP/s and HBM bytes/s (docs/performance.md)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
OPS = ("encode", "edit", "decode", "histogram")


def peaks(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(dense bf16 FLOP/s, HBM bytes/s) of this GPU when it is in PEAKS; (None, None) otherwise."""
    if device.type != "cuda":
        return None, None
    name = device_name(device).upper()
    return next((v for key, v in PEAKS.items() if key in name), (None, None))


def time_fn(fn: Callable[[], Any], warmup: int = 3, reps: int = 20, cuda: Optional[bool] = None) -> float:
    """Median seconds per call: CUDA events when `cuda` (default: CUDA available), else perf_counter."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class Row:
    """One timed case: `impl` is "snce_fast" (the automatic backend, named in `backend`) or "reference"."""

    op: str
    shape: str
    prompts: int
    impl: str
    backend: str
    ms: float
    tflops: Optional[float] = None
    pct_peak: Optional[float] = None
    speedup: Optional[float] = None  # reference ms / snce_fast ms, on the snce_fast row


def _shapes(device: torch.device, quick: bool) -> tuple[tuple[int, int, int], list[int], torch.dtype, int]:
    if device.type == "cuda":
        return (768, 32768, 64), ([1, 64] if quick else [1, 16, 64, 256]), torch.bfloat16, (10 if quick else 30)
    return (128, 2048, 16), ([1, 4] if quick else [1, 4, 16]), torch.float32, (3 if quick else 7)


def run(ops: tuple[str, ...] = OPS, quick: bool = False, device: Optional[str] = None,
        progress: bool = False) -> list[Row]:
    """Time each op in `ops` (snce_fast's automatic backend vs the eager reference) at 77-token prompts;
    `progress` shows a bar over the (op, prompt count) cases."""
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}: expected some of {OPS}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (d, n, k), prompt_counts, dtype, reps = _shapes(dev, quick)
    peak, _ = peaks(dev)
    warm = 2 if dev.type == "cuda" else 1
    sae = SAE.random(d, n, k, dtype=dtype, device=dev, enc_bias_std=0.05).requires_grad_(False)
    shape = f"d{d} n{n} k{k} {str(dtype).removeprefix('torch.')}"
    rows: list[Row] = []
    bar = tqdm(total=len(prompt_counts) * len(ops), desc="bench", unit="case", disable=not progress)
    for p in prompt_counts:
        x = torch.randn(p, 77, d, device=dev, dtype=dtype)
        mask = torch.ones(p, 77, dtype=torch.bool, device=dev)
        mask[:, 0] = False
        values, indices = reference.encode(x, sae)
        layout = histogram.batch_layout(p, 77, dev)
        groups = torch.arange(p, device=dev) % 2
        cases: dict[str, tuple[str, Callable[[], Any], Callable[[], Any], float]] = {}
        if "encode" in ops:
            cases["encode"] = (backend.implementation("encode", dev)[0], lambda: backend.encode(x, sae),
                               lambda: reference.encode(x, sae), 2.0 * p * 77 * d * n)
        if "edit" in ops:
            cases["edit"] = (backend.implementation("edit", dev)[0],
                             lambda: backend.edit(x, sae, [n // 3], edit_mask=mask),
                             lambda: reference.edit(x, sae, [n // 3], edit_mask=mask), 2.0 * p * 77 * d * n)
        if "decode" in ops:
            cases["decode"] = (backend.implementation("decode", dev)[0], lambda: backend.decode(values, indices, sae),
                               lambda: reference.decode(values, indices, sae), 2.0 * p * 77 * k * d)
        if "histogram" in ops:
            state = histogram.Histograms.zeros(2, n, dev)
            flat_i, flat_v = indices.reshape(-1, k), values.reshape(-1, k)
            op_ok = histogram.has_op(dev)
            cases["histogram"] = (
                "cpp" if (op_ok and dev.type == "cpu") else ("cuda" if op_ok else "eager"),
                lambda: histogram.update(flat_i, flat_v, mask.reshape(-1), layout, groups, state),
                lambda: histogram.update(flat_i, flat_v, mask.reshape(-1), layout, groups, state, backend="eager"),
                0.0,
            )
        for op, (name, fast, ref, flops) in cases.items():
            bar.set_postfix_str(f"{op} prompts={p}")
            t_ref = time_fn(ref, warmup=warm, reps=reps, cuda=dev.type == "cuda")
            t_fast = t_ref if name == "reference" else time_fn(fast, warmup=warm, reps=reps, cuda=dev.type == "cuda")
            ref_name = "eager" if op == "histogram" else "reference"
            for impl, bname, t in (("snce_fast", name, t_fast), ("reference", ref_name, t_ref)):
                tf = flops / t / 1e12 if flops else None
                rows.append(Row(op, shape, p, impl, bname, 1e3 * t, tf, 100 * tf * 1e12 / peak if (tf and peak) else None,
                                (t_ref / t_fast) if impl == "snce_fast" else None))
            bar.update()
    bar.close()
    return rows


def table(rows: list[Row]) -> str:
    """A fixed-width text table of the rows."""
    head = f"{'op':<10} {'prompts':>7} {'impl':<10} {'backend':<10} {'ms':>10} {'TFLOP/s':>8} {'%peak':>6} {'speedup':>8}"
    shapes = sorted({r.shape for r in rows})
    lines = [f"shapes: {', '.join(shapes)}; prompts of 77 tokens", head, "-" * len(head)]
    fmt = lambda v, f: (f"{v:{f}}" if v is not None else "-")  # noqa: E731
    for r in rows:
        lines.append(f"{r.op:<10} {r.prompts:>7} {r.impl:<10} {r.backend:<10} {r.ms:>10.3f} "
                     f"{fmt(r.tflops, '8.3f'):>8} {fmt(r.pct_peak, '6.1f'):>6} {fmt(r.speedup, '7.2f') + 'x' if r.speedup else '-':>8}")
    return "\n".join(lines)


def as_json(rows: list[Row], device: torch.device) -> dict[str, Any]:
    return {"benchmark": "snce-fast bench", **metadata(device), "results": [asdict(r) for r in rows]}
