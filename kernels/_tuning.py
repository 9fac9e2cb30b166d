"""Launch configurations per GPU class, and an opt-in tuner that caches by device name.

Kernels are plain `@triton.jit` functions with constexpr block sizes; the config is
chosen here in Python (deterministic, so `torch.compile` can trace it). `tune_encode`
times the candidate configs on the current GPU and stores the winner under the
device name (in memory and in `$SNCE_FAST_TUNE_CACHE`, default
`~/.cache/snce_fast/tuning.json`); later launches on a GPU of that name use it.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from snce_fast.records.atomic import atomic_write_text


@dataclass(frozen=True)
class EncodeConfig:
    BM: int  # rows per program
    BN: int  # latents per tile (>= KP)
    BK: int  # reduction block over d
    FEW: int  # insert one by one when at most FEW rows' candidates, else bitonic merge
    num_warps: int = 4
    num_stages: int = 3


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> tuple[str, int]:
    """(name, streaming multiprocessor count) of CUDA device `index`."""
    p = torch.cuda.get_device_properties(index)
    return p.name, p.multi_processor_count


def gpu_class(name: str) -> str:
    n = name.upper()
    if any(t in n for t in ("H100", "H200", "H800", "H20", "GH200")):
        return "hopper"
    if any(t in n for t in ("B200", "B100", "GB200", "B300")):
        return "blackwell"
    if any(t in n for t in ("A100", "A800", "A30")):
        return "ampere-dc"
    return "default"


def _device_key(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda" or interpreting():
        return "cpu-interpreter", 4
    return device_info(device.index if device.index is not None else torch.cuda.current_device())


# --- persistent tuned cache --------------------------------------------------------
_TUNED: dict[str, dict] = {}
_LOADED = False


def _cache_path() -> str:
    return os.environ.get("SNCE_FAST_TUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "snce_fast", "tuning.json"))


def _load_cache() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        with open(_cache_path()) as f:
            _TUNED.update(json.load(f))
    except (OSError, ValueError):
        pass


def _save_cache() -> None:
    path = _cache_path()
    try:  # a cache: failing to write it costs a re-tune, nothing else
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(_TUNED, indent=1, sort_keys=True))
    except OSError:
        pass


def _m_bucket(M: int) -> int:
    return min(next_pow2(max(M, 1)), 1 << 15)


TUNE_VERSION = 2  # bump when kernels or tables change: older cached choices are then ignored


def _encode_key(dev_name: str, M: int, n: int, d: int, KP: int, dtype: torch.dtype) -> str:
    return f"encode|v{TUNE_VERSION}|{dev_name}|M{_m_bucket(M)}|n{n}|d{d}|kp{KP}|{str(dtype).removeprefix('torch.')}"


# --- default tables ----------------------------------------------------------------
# Register budget, from ptxas on sm_90 (python -m snce_fast.kernels.compile_check, docs/kernels.md):
# a program holds a [BM, BN] fp32 tile, its int64 keys and the [BM, 2 KP] int64 merge buffer, i.e.
# about BM * (BN + 2 KP) / (32 * num_warps) elements per thread. At <= 32 ptxas fits it in the
# 255 registers without spilling for 16-bit inputs (16 x 128, KP 64, 4 warps: 212 registers) and
# spills 20-108 bytes at 24 with fp32 inputs (wider dot operands), so fp32 gets half; at 64 it
# spills 88-860 bytes per thread; the 128 x 256, KP 256 tile took ptxas more than 7 minutes.
NO_SPILL_ELEMENTS = 32
NO_SPILL_ELEMENTS_FP32 = 16
TUNE_MAX_ELEMENTS = 64


def elements_per_thread(BM: int, BN: int, KP: int, num_warps: int) -> float:
    """Register-resident elements per thread of one encode program (KP 1 needs no merge buffer)."""
    return BM * (BN + (2 * KP if KP > 1 else 0)) / (32 * num_warps)


def encode_candidates(M: int, KP: int, cls: str, itemsize: int) -> list[EncodeConfig]:
    """Configs worth trying for one shape on one GPU class. The first is the default: within the no-spill
    budget where any tile fits it (at KP 256 even the smallest tile spills a little: then the smallest)."""
    if cls == "cpu-interpreter":  # few, large tiles: the interpreter pays per op, not per element
        return [EncodeConfig(BM=min(64, max(16, next_pow2(M))), BN=max(64, KP), BK=64, FEW=4, num_warps=1, num_stages=1)]
    BN = max(128, KP)
    bk = 64 if itemsize <= 2 else 32
    # fp32 tiles (fp32 or tf32) at 4 stages spill on sm_90 since NaN-aware selection (k 64: 255 registers,
    # 20 bytes); 3 stages hold 198 registers and no spill
    stages = 3 if cls == "default" or itemsize > 2 else 4
    cap_bm = min(128, max(16, next_pow2(M)))
    out = []
    for limit in (NO_SPILL_ELEMENTS if itemsize <= 2 else NO_SPILL_ELEMENTS_FP32, TUNE_MAX_ELEMENTS):
        for bm in (128, 64, 32, 16):
            for bn in sorted({BN, max(256, KP)}):
                for w in (8, 4):
                    c = EncodeConfig(BM=bm, BN=bn, BK=bk, FEW=8, num_warps=w, num_stages=stages)
                    if bm <= cap_bm and elements_per_thread(bm, bn, KP, w) <= limit and c not in out:
                        out.append(c)
    if not out:  # KP so large that even the smallest tile spills: the smallest tile, most warps
        out.append(EncodeConfig(BM=16, BN=BN, BK=bk, FEW=8, num_warps=8, num_stages=stages))
    return out


def _tuned(dev_name: str, M: int, n: int, d: int, KP: int, dtype: torch.dtype) -> Optional[EncodeConfig]:
    """The cached tuning choice for this GPU name and shape bucket, if any."""
    _load_cache()
    hit = _TUNED.get(_encode_key(dev_name, M, n, d, KP, dtype))
    return EncodeConfig(**hit) if hit is not None else None


def encode_config(M: int, n: int, d: int, KP: int, dtype: torch.dtype, device: torch.device) -> EncodeConfig:
    """The config a launch uses: a tuned one for this device name if cached, else the table's first.
    `dtype`: the dtype the tiles are multiplied in (fp32 when x and W_enc differ, see `encode_topk`)."""
    name, _ = _device_key(device)
    cls = "cpu-interpreter" if name == "cpu-interpreter" else gpu_class(name)
    if cls != "cpu-interpreter":
        hit = _tuned(name, M, n, d, KP, dtype)
        if hit is not None:
            return hit
    return encode_candidates(M, KP, cls, torch.empty((), dtype=dtype).element_size())[0]


def encode_splits(M: int, n: int, KP: int, cfg: EncodeConfig, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): split the n latents across programs so that small M still fills the GPU.

    Each split is a multiple of BN wide and at least 4 tiles (so its first, expensive
    bitonic merge is amortised); enough splits to give ~2 programs per SM.
    """
    _, sms = _device_key(device)
    return split_plan(M, n, cfg, sms, min_tiles=1 if interpreting() else 4)


def split_plan(M: int, n: int, cfg: EncodeConfig, sms: int, min_tiles: int = 4) -> tuple[int, int]:
    """`encode_splits` for a GPU with `sms` multiprocessors."""
    row_blocks = max(1, -(-M // cfg.BM))
    tiles = -(-n // cfg.BN)
    want = -(-2 * sms // row_blocks)
    splits = max(1, min(want, tiles // min_tiles if tiles >= min_tiles else 1))
    chunk_tiles = -(-tiles // splits)
    splits = -(-tiles // chunk_tiles)
    return splits, chunk_tiles * cfg.BN


def tune_encode(
    run: Callable[[EncodeConfig], None], M: int, n: int, d: int, KP: int, dtype: torch.dtype, device: torch.device,
    reps: int = 20, force: bool = False,
) -> Optional[EncodeConfig]:
    """Time `run(cfg)` for each candidate on this GPU; cache and return the fastest (None off-GPU).
    A shape bucket already tuned on a GPU of this name is not timed again unless `force`. Candidates
    that fail are reported (a warning naming them); if every one fails, the first error is raised."""
    if device.type != "cuda" or interpreting():
        return None
    name, _ = _device_key(device)
    hit = _tuned(name, M, n, d, KP, dtype)
    if hit is not None and not force:
        return hit
    cands = encode_candidates(M, KP, gpu_class(name), torch.empty((), dtype=dtype).element_size())
    with _on(device):  # time on the tensors' GPU, whichever is current
        best, failed = _fastest(run, cands, lambda fn: _cuda_ms(fn, device, reps))
    if failed:
        what = "; ".join(f"{_label(c)}: {err}" for c, err in failed[:3])
        if best is None:
            raise RuntimeError(f"tune: all {len(cands)} candidate configs failed on {name} "
                               f"(M={M}, n={n}, d={d}, KP={KP}, {dtype}): {what}")
        warnings.warn(f"tune: {len(failed)} of {len(cands)} candidate configs failed on {name} and were "
                      f"skipped: {what}", RuntimeWarning, stacklevel=3)
    _TUNED[_encode_key(name, M, n, d, KP, dtype)] = asdict(best)
    _save_cache()
    return best


def _on(device: torch.device):
    return torch.cuda.device(device)


def _label(cfg: EncodeConfig) -> str:
    return f"BM{cfg.BM} BN{cfg.BN} BK{cfg.BK} w{cfg.num_warps} s{cfg.num_stages}"


def _fastest(run: Callable[[EncodeConfig], None], cands: list[EncodeConfig],
             time_ms: Callable[[Callable[[], None]], float]) -> tuple[Optional[EncodeConfig], list[tuple[EncodeConfig, str]]]:
    """(fastest config, [(config, error)] of those that raised): a config that does not compile
    (e.g. out of shared memory) is skipped, but never silently."""
    best, best_t, failed = None, float("inf"), []
    for cfg in cands:
        try:
            t = time_ms(lambda: run(cfg))
        except Exception as e:  # noqa: BLE001 - any launch/compile failure disqualifies the config
            failed.append((cfg, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best, failed


def _cuda_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Mean ms per call by CUDA events, after one untimed call (which compiles)."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps
