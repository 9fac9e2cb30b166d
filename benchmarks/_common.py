"""Shared helpers for the kernel benchmarks: timing, peaks, metadata, JSON and plots.

On CUDA: CUDA-event timing, median of warm runs, bf16. Without CUDA the scripts run in a
clearly labelled CPU mode (tiny shapes, fp32, Triton interpreter for the fused kernels);
those numbers are CPU numbers and say nothing about GPU speed.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import torch

from snce_fast import benchmarking
from snce_fast import plots
from snce_fast.benchmarking import time_fn
from snce_fast.records.atomic import atomic_write_json
from snce_fast.sae import SAE

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused kernels can only run interpreted here

def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "CPU (no CUDA; Triton interpreter for fused kernels)"


def peaks() -> tuple[Optional[float], Optional[float]]:
    """Dense bf16 peak FLOP/s and HBM bytes/s of this GPU (docs/performance.md), (None, None) off-GPU."""
    return benchmarking.peaks(torch.device("cuda" if ON_GPU else "cpu"))


def limit_tuning(n: Optional[int]) -> None:
    """Make `kernels.tune` time only the first n candidate configs per shape (None: all). A benchmark knob
    for short GPU sessions (scripts/gpu_session.sh); the default config (the first) is always among them."""
    if n is None:
        return
    if n < 1:
        raise SystemExit(f"--tune-candidates must be >= 1, got {n}")
    from snce_fast.kernels import _tuning

    if "encode_candidates" not in _tuning.tune_encode.__code__.co_names:
        raise SystemExit("--tune-candidates: kernels._tuning.tune_encode no longer calls encode_candidates; "
                         "update benchmarks/_common.py limit_tuning")
    full = _tuning.encode_candidates
    if getattr(full, "_limited", None) is not None:  # called twice: wrap the original only
        full = full._limited
    limited = lambda *a, **kw: full(*a, **kw)[:n]  # noqa: E731
    limited._limited = full
    _tuning.encode_candidates = limited  # tune_encode looks it up in its module at call time


def mode() -> str:
    return "gpu" if ON_GPU else "cpu"


def bench(fn: Callable[[], Any], warmup: int = 3, reps: int = 20) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    return time_fn(fn, warmup=warmup, reps=reps, cuda=ON_GPU)


def metadata() -> dict[str, Any]:
    """snce_fast.benchmarking.metadata (versions, commit, date) with this mode's device label and note."""
    return {
        **benchmarking.metadata(torch.device("cuda" if ON_GPU else "cpu")),
        "device": device_name(),
        "note": None if ON_GPU else "CPU mode: tiny shapes, fp32, fused kernels run in the Triton interpreter; "
        "these are NOT GPU numbers and the fused timings are not performance figures",
    }


def make_sae(d: int, n: int, k: int, dtype: torch.dtype, device: str):
    return SAE.random(d, n, k, dtype=dtype, device=device, enc_bias_std=0.05).requires_grad_(False)


def dense_fits(M: int, n: int, itemsize: int, limit: float = 8e9) -> bool:
    return M * n * itemsize <= limit


def write(op: str, rows: list[dict], extra: Optional[dict] = None, quiet: bool = False) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{op}_{mode()}.json")
    atomic_write_json(path, {"op": op, **metadata(), **(extra or {}), "results": rows})
    if not quiet:
        print(f"wrote {path}")
    return path


def checkpoint(op: str, rows: list[dict]) -> None:
    """Write the rows measured so far (marked partial), so a run cut off by a time limit keeps them."""
    finish_rows(rows)
    write(op, rows, {"partial": True}, quiet=True)


def plot(op: str, rows: list[dict], x_key: str = "prompts") -> Optional[str]:
    """results/<op>_<mode>.png: median ms per implementation against `x_key` (snce_fast.plots)."""
    path = os.path.join(RESULTS, f"{op}_{mode()}.png")
    plots.benchmark_times(rows, path, op, device_name()[:60], x_key=x_key,
                          warning=None if ON_GPU else "CPU MODE - not GPU numbers")
    print(f"wrote {path}")
    return path


def print_rows(rows: list[dict]) -> None:
    label = "" if ON_GPU else " [CPU]"
    for r in rows:
        bits = [f"{r.get('group', '')}", f"prompts={r['prompts']}", f"{r['impl']:<22}"]
        bits.append(f"{r['ms']:.3f} ms{label}" if r["ms"] else f"skipped ({r.get('skip')})")
        for key in ("tflops", "pct_peak", "x_hbm_floor", "fused_speedup_over_this"):
            if r.get(key) is not None:
                bits.append(f"{key}={r[key]:.3g}")
        print("  ".join(bits))


def finish_rows(rows: list[dict], flops_key: str = "flops", bytes_key: str = "bytes") -> None:
    """Add TFLOP/s, % of dense bf16 peak, time / HBM floor and speedups of 'fused' over each impl."""
    peak, bw = peaks()
    fused = {(r.get("group"), r["prompts"]): r["ms"] for r in rows if r["impl"] == "fused" and r["ms"]}
    for r in rows:
        if not r["ms"]:
            continue
        s = r["ms"] / 1e3
        r["tflops"] = r[flops_key] / s / 1e12 if r.get(flops_key) else None
        r["pct_peak"] = 100 * r[flops_key] / s / peak if (peak and r.get(flops_key)) else None
        r["x_hbm_floor"] = s / (r[bytes_key] / bw) if (bw and r.get(bytes_key)) else None
        f = fused.get((r.get("group"), r["prompts"]))
        r["fused_speedup_over_this"] = r["ms"] / f if f else None


def with_select(path: str, fn: Callable[[], Any], grid: str = "tiles", pdl: bool = True) -> Callable[[], Any]:
    """`fn` run under the encode kernels' selection `path` ("sort", "compact" or "threshold", docs/kernels.md), the
    threshold filter's `grid` ("tiles" or "persistent") and its programmatic dependent launch (`pdl`), whatever
    SNCE_FAST_ENCODE_SELECT, SNCE_FAST_THRESHOLD_GRID and SNCE_FAST_THRESHOLD_PDL say, so that one run times
    several paths side by side."""
    import importlib

    encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")
    thr_mod = importlib.import_module("snce_fast.kernels.encode_threshold")

    def run() -> Any:
        old, encode_mod.SELECT = encode_mod.SELECT, path
        old_grid, thr_mod.GRID = thr_mod.GRID, grid
        old_pdl, thr_mod.PDL = thr_mod.PDL, pdl
        try:
            return fn()
        finally:
            encode_mod.SELECT, thr_mod.GRID, thr_mod.PDL = old, old_grid, old_pdl
    return run


def topk_agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """How a fused (values, indices) result agrees with the reference's, recorded beside its time: the largest
    value difference (both sorted descending) and the mean fraction of each row's indices the reference also
    chose (below 1 only through ties or rounding at the k-th value)."""
    v, i = got
    rv, ri = want
    same = (i.reshape(-1, i.shape[-1]).long().unsqueeze(-1) == ri.reshape(-1, ri.shape[-1]).long().unsqueeze(-2))
    return {"max_value_err": float((v.float() - rv.float()).abs().nan_to_num(0.0).max()) if v.numel() else 0.0,
            "index_overlap": float(same.any(-1).float().mean()) if i.numel() else 1.0}


def graphed(fn: Callable[[], Any]) -> tuple[Optional[Callable[[], Any]], Optional[str]]:
    """`fn` captured in a CUDA graph after two warm-up calls on a side stream: (replay, None), or
    (None, why not). Replays time the kernels without Python and launch overhead (what
    torch.compile(mode="reduce-overhead") or a hand-captured graph gets in a deployment)."""
    if not ON_GPU:
        return None, "CUDA graphs need a GPU"
    try:  # pragma: no cover - GPU only
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except Exception as e:  # pragma: no cover - GPU only; a capture failure is a result, not a crash
        why = f"CUDA graph capture failed: {type(e).__name__}: {e}"[:300]
        try:
            torch.cuda.synchronize()
        except Exception as after:  # the failed capture left the context unusable: later rows would fail too
            why += f" (and the device then raised {type(after).__name__}: {after})"[:200]
        return None, why


def time_impls(impls: dict[str, Optional[Callable[[], Any]]], base: dict, reps: int,
               skip_reasons: Optional[dict[str, str]] = None) -> list[dict]:
    """One row per implementation: `base` + impl name + median ms (or why it was skipped)."""
    rows = []
    for name, fn in impls.items():
        row = {**base, "impl": name, "ms": None}
        if fn is None:
            row["skip"] = (skip_reasons or {}).get(name) or (
                "torch.compile not run in CPU mode" if not ON_GPU else "skipped")
        else:
            try:
                row["ms"] = 1e3 * bench(fn, warmup=2 if ON_GPU else 1, reps=reps)
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                row["skip"] = f"OOM: {e}"[:200]
                torch.cuda.empty_cache()
            except Exception as e:  # pragma: no cover - GPU only: a short session records it and goes on
                _failed(row, "skip", e)
        rows.append(row)
    return rows


def _failed(row: dict, key: str, e: Exception) -> None:
    """On a GPU, record a failing implementation in its row (and say so on stderr) so that one broken path
    does not cost a short session the other rows; on the CPU (tests, CI) the error propagates."""
    if not ON_GPU:
        raise e
    row[key] = f"error: {type(e).__name__}: {e}"[:300]
    row["error"] = True
    print(f"ERROR {row.get('impl')} (prompts={row.get('prompts')}): {row[key]}", file=sys.stderr, flush=True)


def record_agreement(rows: list[dict], impls: dict[str, Optional[Callable[[], Any]]], names: tuple[str, ...],
                     measure: Callable[[Any], dict]) -> None:
    """`vs_reference` = measure(output) for each timed row of `names` (its agreement with the fp32 reference,
    recorded beside its time)."""
    for r in rows:
        if r["impl"] in names and r["ms"]:
            try:
                r["vs_reference"] = measure(impls[r["impl"]]())
            except Exception as e:  # pragma: no cover - GPU only (see _failed)
                _failed(r, "vs_reference", e)


def report(op: str, rows: list[dict]) -> None:
    """Derived metrics, a printed table, JSON and a PNG under benchmarks/results/."""
    finish_rows(rows)
    print_rows(rows)
    write(op, rows)
    plot(op, rows)
