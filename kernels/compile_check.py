"""Compile every Triton kernel ahead of time for a GPU architecture, with no GPU present.

    python -m snce_fast.kernels.compile_check [--arch 90 80] [--full] [--json OUT] [--jobs N]

The interpreter (`TRITON_INTERPRET=1`) runs a kernel as Python and accepts code that the
real compiler rejects (a reassigned constexpr, a Python list multiplied by a loop
variable, ...). This tool runs the real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin
with ptxas) for the launch configurations the dispatcher picks at the docs/performance.md
shapes, with the same constexprs, warps, stages and integer specialisations as a real
launch, and reads registers, stack frame and spill bytes from ptxas's report. `--full`
adds every autotuning candidate. It exits 1 if any configuration fails to compile. `--gate` (CI)
also disassembles each cubin and exits 1 when a default config spills or has no tensor-core
instruction although its dtype should use them (`gate`). `kernels/cost_report.py` builds on this.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

# arch -> (gpu class of kernels._tuning, SM count of the reference part)
ARCHS = {80: ("ampere-dc", 108), 90: ("hopper", 132), 100: ("blackwell", 148)}
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int64": "*i64", "int32": "*i32", "int8": "*i8",
        "bool": "*u1"}  # triton canonicalises a torch.bool pointer to *u1
PROMPT_TOKENS = 77


@dataclass
class Case:
    """One kernel launch configuration to compile."""
    kernel: str  # a name of `KERNELS`
    label: str
    pointers: dict[str, str]  # arg -> torch dtype name
    ints: dict[str, int]  # arg -> a representative runtime value (specialised like a launch)
    floats: tuple[str, ...] = ()
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False  # its SASS must hold tensor-core MMA instructions (`--gate`)
    spill_allowed: bool = False  # a register spill is expected, not a regression (`--gate`)

    def key(self) -> tuple:
        return (self.kernel, tuple(sorted(self.pointers.items())), tuple(sorted(self._int_spec().items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())), self.num_warps, self.num_stages)

    def _int_spec(self) -> dict[str, str]:
        """Triton's launch specialisation of an int: == 1 becomes a constant, % 16 == 0 gets 'D'."""
        return {k: ("1" if v == 1 else "D" if v % 16 == 0 else "") for k, v in self.ints.items()}


# case kernel name -> (module, jit function)
KERNELS = {
    "encode_topk": ("encode_topk", "_encode_topk_kernel"),
    "encode_compact": ("encode_topk", "_encode_compact_kernel"),
    "merge_topk": ("encode_topk", "_merge_topk_kernel"),
    "edit_residual": ("snce_edit", "_edit_residual_kernel"),
    "edit_keys": ("snce_edit", "_edit_keys_kernel"),
    "sparse_decode": ("sparse_decode", "_sparse_decode_kernel"),
    "threshold": ("encode_threshold", "_threshold_kernel"),
    "threshold_filter": ("encode_threshold", "_filter_kernel"),
    "threshold_select": ("encode_threshold", "_select_topk_kernel"),
    "threshold_edit": ("snce_edit", "_select_edit_kernel"),
}


def _kernel(name: str) -> Any:
    import importlib

    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: expected one of {sorted(KERNELS)}")
    module, fn = KERNELS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def _default_plan(arch: int, x_dtype: Any, w_dtype: Any, k: int, M: int, n: int) -> tuple[list, int, int]:
    """(tile candidates, default first; its splits and chunk) of one encode shape on sm_<arch>'s reference part."""
    import torch

    from ._tuning import encode_candidates, next_pow2, split_plan
    from .encode_topk import operand_dtype

    cls, sms = ARCHS[arch]
    op = operand_dtype(x_dtype, w_dtype)  # the table is chosen by the dtype the tiles multiply in
    cands = encode_candidates(M, next_pow2(k), cls, torch.empty((), dtype=op).element_size())
    splits, chunk = split_plan(M, n, cands[0], sms)
    return cands, splits, chunk


def encode_case(arch: int, x_dtype: Any, w_dtype: Any, k: int, M: int, n: int = 32768, d: int = 768,
                wide: bool = False, full: bool = False, compact: bool = False) -> list[Case]:
    """The default launch configuration (every tuning candidate with `full`) of one encode shape for sm_<arch>;
    `compact`: of the opt-in compact selection kernel (`compact_meta`) instead of the sort kernel."""
    import torch

    from ._tuning import NO_SPILL_ELEMENTS, NO_SPILL_ELEMENTS_FP32, elements_per_thread, next_pow2, split_plan
    from .encode_topk import compact_meta, kernel_meta, operand_dtype

    KP = next_pow2(k)
    op = operand_dtype(x_dtype, w_dtype)
    budget = NO_SPILL_ELEMENTS if torch.empty((), dtype=op).element_size() <= 2 else NO_SPILL_ELEMENTS_FP32
    cands, _, _ = _default_plan(arch, x_dtype, w_dtype, k, M, n)
    out = []
    for j, cfg in enumerate(cands if full else cands[:1]):
        meta = (compact_meta if compact else kernel_meta)(cfg, KP, x_dtype, w_dtype, wide=wide)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        splits, chunk = split_plan(M, n, cfg, ARCHS[arch][1])
        xt, wt = (str(t).removeprefix("torch.") for t in (x_dtype, w_dtype))
        dts = xt if xt == wt else f"{xt} x / {wt} W"
        ptrs = dict(x_ptr=xt, w_ptr=wt, b_ptr="float32", out_ptr="int64")
        ints = dict(M=M, N=n, D=d, CHUNK=chunk, stride_xm=d, stride_xd=1, stride_wd=n, stride_wn=1,
                    stride_om=splits * KP)
        if compact:  # per-(row, split) scratch buffers of CAP (value, index) slots
            ptrs.update(bv_ptr="float32", bi_ptr="int32")
            ints.update(stride_bm=splits * meta["CAP"])
        out.append(Case(
            "encode_compact" if compact else "encode_topk",
            f"{dts} k{k} M{M} n{n} d{d}{' int64 offsets' if wide else ''} "
            f"BM{meta['BM']} BN{cfg.BN} BK{cfg.BK} w{warps} s{stages}",
            ptrs, ints, constexprs=meta, num_warps=warps, num_stages=stages,
            # tiles multiplied in a 16-bit dtype run on tensor cores; exact fp32 ("ieee") does not, tf32 does
            tensor_cores=op in (torch.float16, torch.bfloat16)
            or (op == torch.float32 and meta.get("PRECISION") in ("tf32", "tf32x3")),
            # a default the table itself says cannot fit (no tile within the no-spill budget) may spill;
            # tuning candidates (j > 0) are allowed to (they are only timed by `tune`); the opt-in compact
            # kernel also with int64 offsets, where its default spills 16 bytes (docs/kernels.md)
            spill_allowed=j > 0 or elements_per_thread(cfg.BM, cfg.BN, KP, warps) > budget or (compact and wide)))
    return out


def _encode_shapes() -> list[tuple]:
    """(x dtype, W_enc dtype, k, M, n, d, int64 offsets) of every default encode case."""
    import torch

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k in (1, 17, 32, 64, 256):
            for M in (1,) + tuple(p * PROMPT_TOKENS for p in (1, 16, 64, 256)):  # M 1: specialised to a constant
                out.append((dtype, dtype, k, M, 32768, 768, False))
    out.append((torch.float16, torch.float32, 64, PROMPT_TOKENS, 32768, 768, False))  # fp16 pipeline, fp32 SAE
    # the largest SAE of the issue (n 524288 at d 4096): W_enc offsets reach 2**31, int64 path
    out.append((torch.bfloat16, torch.bfloat16, 64, PROMPT_TOKENS, 524288, 4096, True))
    return out


def encode_cases(arch: int, full: bool, compact: bool = False) -> list[Case]:
    """The sort encode kernel (`compact`: the opt-in compact one) at every default encode shape."""
    out = []
    for x_dtype, w_dtype, k, M, n, d, wide in _encode_shapes():
        out += encode_case(arch, x_dtype, w_dtype, k, M, n=n, d=d, wide=wide, full=full, compact=compact)
    return out


def _key_splits(arch: int, dtype: Any, k: int, M: int, n: int = 32768) -> int:
    """S = splits * KP: the candidate keys per token the default encode launch of this shape writes."""
    from ._tuning import next_pow2

    return _default_plan(arch, dtype, dtype, k, M, n)[1] * next_pow2(k)


def merge_cases(arch: int, full: bool) -> list[Case]:
    """`_merge_topk_kernel` after the default encode launch (values in x's dtype, as `kernels.encode`)."""
    import torch

    from ._tuning import next_pow2
    from .encode_topk import merge_blocks

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dt = str(dtype).removeprefix("torch.")
        for k in (1, 17, 64, 256):
            for M in (1, PROMPT_TOKENS, 16 * PROMPT_TOKENS) if full else (PROMPT_TOKENS, 16 * PROMPT_TOKENS):
                S = _key_splits(arch, dtype, k, M)
                meta = merge_blocks(S, next_pow2(k), interpreter=False)
                warps = meta.pop("num_warps")
                out.append(Case(
                    "merge_topk", f"{dt} k{k} M{M} S{S} BS{meta['BS']} w{warps}",
                    dict(key_ptr="int64", v_ptr=dt, i_ptr="int32"),
                    dict(S=S, K=k, stride_km=S, stride_vm=k, stride_im=k),
                    constexprs=meta, num_warps=warps))
    return out


def edit_keys_cases(arch: int, full: bool) -> list[Case]:
    """`_edit_keys_kernel` (the patch's call) after the default encode launch; the allowed mask as the patch
    passes it, a [B, L] bool expand of an [L] mask (stride 0, 1), or none (`HAS_ALLOWED` False)."""
    import torch

    from .snce_edit import edit_keys_blocks

    d = 768
    variants = ((1, False, True), (3, True, True), (1, False, False))  # (T, clamp, mask)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dt = str(dtype).removeprefix("torch.")
        for k in (1, 17, 64, 256):
            for M in (PROMPT_TOKENS, 16 * PROMPT_TOKENS):
                S = _key_splits(arch, dtype, k, M)
                for T, use_clamp, masked in variants if full or k == 64 else variants[:1]:
                    meta = edit_keys_blocks(S, k, T, d, interpreter=False, has_allowed=masked)
                    warps = meta.pop("num_warps")
                    ints = dict(S=S, K=k, T=T, D=d, stride_xm=d, stride_km=S, stride_om=d)
                    if masked:  # the patch's [B, L] expand of its [L] BOS mask
                        ints.update(a_rows=PROMPT_TOKENS, stride_a0=0, stride_a1=1)
                    else:  # `_allowed_args` without a mask
                        ints.update(a_rows=1, stride_a0=0, stride_a1=0)
                    out.append(Case(
                        "edit_keys", f"{dt} k{k} M{M} S{S} T{T} d{d} clamp={use_clamp} mask={masked}",
                        dict(x_ptr=dt, key_ptr="int64", t_ptr="int32", wt_ptr="float32",
                             a_ptr="bool" if masked else "int32", o_ptr=dt),
                        ints, floats=("scale", "clamp"), constexprs=dict(USE_CLAMP=use_clamp, **meta),
                        num_warps=warps))
    return out


def edit_cases(arch: int, full: bool) -> list[Case]:
    from .snce_edit import edit_blocks

    out = []
    for dt in ("bfloat16", "float16", "float32"):
        for k in (1, 17, 64, 256):
            for T in (1, 3) if full or k == 64 else (1,):
                for d in (768, 1280, 4096) if full else (768,):
                    meta = edit_blocks(k, T, d, interpreter=False)
                    warps = meta.pop("num_warps")
                    for use_clamp in (False, True):
                        out.append(Case(
                            "edit_residual", f"{dt} k{k} T{T} d{d} clamp={use_clamp}",
                            dict(x_ptr=dt, v_ptr="float32", i_ptr="int32", t_ptr="int32", wt_ptr="float32",
                                 a_ptr="int8", o_ptr=dt),
                            dict(K=k, T=T, D=d, stride_xm=d, stride_vm=k, stride_im=k, stride_om=d),
                            floats=("scale", "clamp"), constexprs=dict(USE_CLAMP=use_clamp, **meta),
                            num_warps=warps))
    return out


def decode_cases(arch: int, full: bool) -> list[Case]:
    from .sparse_decode import decode_blocks

    out = []
    for dt in ("bfloat16", "float16", "float32"):
        for idx in ("int32", "int64"):
            for k in (1, 17, 64, 256):
                for d in (768, 4096) if full else (768,):
                    meta = decode_blocks(k, d, interpreter=False)
                    warps = meta.pop("num_warps")
                    out.append(Case(
                        "sparse_decode", f"{dt} idx={idx} k{k} d{d}",
                        dict(v_ptr=dt, i_ptr=idx, w_ptr=dt, b_ptr=dt, o_ptr=dt),
                        dict(K=k, D=d, stride_vm=k, stride_im=k, stride_wn=d, stride_wd=1, stride_om=d),
                        constexprs=meta, num_warps=warps))
    return out


def cases(arch: int, full: bool = False) -> list[Case]:
    """Every distinct launch configuration for `arch` (duplicates removed)."""
    seen, out = set(), []
    every = (encode_cases(arch, full) + encode_cases(arch, full, compact=True) + merge_cases(arch, full)
             + edit_cases(arch, full) + edit_keys_cases(arch, full) + decode_cases(arch, full) + threshold_cases(arch))
    for c in every:
        if c.key() not in seen:
            seen.add(c.key())
            out.append(c)
    return out


def threshold_case(arch: int, x_dtype: Any, w_dtype: Any, k: int, M: int, n: int = 32768, d: int = 768,
                   persistent: bool = False) -> list[Case]:
    """The launches of the "threshold" selection (kernels/encode_threshold.py) for one shape on sm_<arch>: sampling,
    filter, and the tail as `kernels.encode` (select) and as the patch's residual edit (threshold_edit);
    `persistent`: with the filter on the persistent grid (`SNCE_FAST_THRESHOLD_GRID=persistent`)."""
    from .encode_threshold import (filter_meta, filter_programs, gpu_threshold_config, select_blocks, threshold_meta,
                                   threshold_plan)
    from .encode_topk import operand_dtype
    from .snce_edit import edit_blocks

    op = operand_dtype(x_dtype, w_dtype)
    plan = threshold_plan(M, n, k, gpu_threshold_config(M, op.itemsize, persistent), interpreter=False)
    xt, wt = (str(t).removeprefix("torch.") for t in (x_dtype, w_dtype))
    label = f"{xt if xt == wt else f'{xt} x / {wt} W'} k{k} M{M} n{n} d{d}"
    strides = dict(stride_xm=d, stride_xd=1, stride_wd=n, stride_wn=1)
    gdc = arch >= 90  # the filter as a programmatic dependent launch (`uses_pdl`)
    tm, fm, sb = (threshold_meta(plan, x_dtype, w_dtype, gdc=gdc), filter_meta(plan, x_dtype, w_dtype, ptx=True, gdc=gdc),
                  select_blocks(plan, interpreter=False))
    eb = edit_blocks(k, 1, d, interpreter=False)
    tc = tm["PRECISION"] in ("tf32", "tf32x3")  # as `encode_case`: 16-bit tiles, or 16-bit x as tf32
    tile = (f" BM{plan.cfg.BM} BN{plan.cfg.BN} BK{plan.cfg.BK} w{plan.cfg.num_warps} s{plan.cfg.num_stages}"
            + (" persistent" if persistent else ""))
    return [
        Case("threshold", label + tile + f" G{plan.G}",
             dict(x_ptr=xt, w_ptr=wt, b_ptr="float32", gmax_ptr="int32", thr_ptr="int32", cnt_ptr="int32",
                  ticket_ptr="int32"),
             dict(M=M, N=n, D=d, K=k, NS=plan.NS, step=plan.step, stride_gm=plan.G, **strides),
             constexprs={k_: v for k_, v in tm.items() if k_ not in ("num_warps", "num_stages")},
             num_warps=tm["num_warps"], num_stages=tm["num_stages"], tensor_cores=tc),
        Case("threshold_filter", label + tile + f" CAP{plan.CAP}",
             dict(x_ptr=xt, w_ptr=wt, b_ptr="float32", thr_ptr="int32", cnt_ptr="int32", out_ptr="int64"),
             dict(M=M, N=n, D=d, MB=plan.MB, CAP=plan.CAP,
                  NP=filter_programs(plan, ARCHS[arch][1]) if persistent else 0,
                  stride_om=plan.CAP, **strides),
             constexprs={k_: v for k_, v in fm.items() if k_ not in ("num_warps", "num_stages")},
             num_warps=fm["num_warps"], num_stages=fm["num_stages"], tensor_cores=tc),
        # the tail has no matmul; with 16-bit x and an fp32 W_enc its overflow path (`_direct_row`, fp32
        # products of rows that overflowed) keeps 4 bytes on the stack at 80 registers: allowed
        Case("threshold_select", f"{label} CAP{plan.CAP} BS{plan.BS}",
             dict(key_ptr="int64", cnt_ptr="int32", x_ptr=xt, w_ptr=wt, b_ptr="float32", v_ptr=xt, i_ptr="int32"),
             dict(CAP=plan.CAP, N=n, D=d, K=k, stride_km=plan.CAP, stride_vm=k, stride_im=k, **strides),
             constexprs={k_: v for k_, v in sb.items() if k_ != "num_warps"}, num_warps=sb["num_warps"],
             num_stages=1, spill_allowed=xt != wt),
        # the patch's call under the threshold path: the tail fused into the residual edit (BOS mask expand)
        Case("threshold_edit", f"{label} CAP{plan.CAP} BS{plan.BS} T1 mask=True",
             dict(x_ptr=xt, key_ptr="int64", cnt_ptr="int32", w_ptr=wt, b_ptr="float32", t_ptr="int32",
                  wt_ptr="float32", a_ptr="bool", o_ptr=xt),
             dict(CAP=plan.CAP, N=n, K=k, T=1, D=d, stride_xm=d, stride_xd=1, stride_km=plan.CAP, stride_wd=n,
                  stride_wn=1, stride_om=d, a_rows=PROMPT_TOKENS, stride_a0=0, stride_a1=1),
             floats=("scale", "clamp"),
             constexprs=dict(USE_CLAMP=False, HAS_ALLOWED=True, KP=sb["KP"], BS=sb["BS"], BNF=sb["BNF"],
                             BKF=sb["BKF"], BT=eb["BT"], BD=eb["BD"]),
             num_warps=max(sb["num_warps"], eb["num_warps"]), num_stages=1, spill_allowed=xt != wt),
    ]


def threshold_cases(arch: int) -> list[Case]:
    """The threshold selection at the SPEC shape: bf16 at k 1/17/64/256 for 16 prompts, and at k 64 for one token
    (BM 64) and one prompt; fp16 x with an fp32 SAE and fp32 at k 64; the persistent filter grid at k 64 for one
    token, one prompt and 16 prompts (bf16), and 16 prompts (fp32)."""
    import torch

    bf, M16 = torch.bfloat16, 16 * PROMPT_TOKENS
    out = []
    for k in (1, 17, 64, 256):
        out += threshold_case(arch, bf, bf, k, M16)
    for M in (1, PROMPT_TOKENS):
        out += threshold_case(arch, bf, bf, 64, M)
    for xd, wd in ((torch.float16, torch.float32), (torch.float32, torch.float32)):
        out += threshold_case(arch, xd, wd, 64, M16)
    for M in (1, PROMPT_TOKENS, M16):
        out += threshold_case(arch, bf, bf, 64, M, persistent=True)
    out += threshold_case(arch, torch.float32, torch.float32, 64, M16, persistent=True)
    return out


def _ptxas_resources(log: str) -> dict[str, int]:
    """registers, stack frame and spill bytes from `ptxas -v` output (the last function in it)."""
    out: dict[str, int] = {}
    for key, pat in (("reg", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                     ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        found = re.findall(pat, log)
        if found:
            out[key] = int(found[-1])
    return out


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for a block (triton reads its knobs from the environment lazily)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_binary(case: Case, arch: int, fn: Any = None, cache_dir: Optional[str] = None) -> tuple[Any, str]:
    """(triton's compiled kernel, ptxas -v log) of one case for sm_<arch>; raises on a compile error."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(case.kernel) if fn is None else fn
    signature, constexprs, attrs = {}, dict(case.constexprs), {}
    spec = case._int_spec()
    for i, name in enumerate(fn.arg_names):
        if name in case.pointers:
            signature[name] = _PTR[case.pointers[name]]
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif name in spec:
            if spec[name] == "1":
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if spec[name]:
                    attrs[(i,)] = BaseBackend.parse_attr("D")
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
    # with TRITON_DUMP_PTXAS_LOG triton prints `ptxas -v` (registers, spills) to stdout
    # (TRITON_DEFAULT_FP_FUSION=1 is triton's current default, set only to silence 3.9's warning about it)
    env = dict(TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"),
               **({"TRITON_CACHE_DIR": cache_dir} if cache_dir else {}))
    log = io.StringIO()
    src = ASTSource(fn, signature, constexprs, attrs)
    with _env(**env), contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    return compiled, log.getvalue()


_LAYOUT_DEF = re.compile(r"^(#\w+) = #ttg\.(\w+)<\{(.*)\}>", re.M)
_ASM_LAYOUT = re.compile(r"tt\.elementwise_inline_asm.*?->\s*tensor<([0-9x]+)x\w+,\s*(#\w+)>")
# triton 3.6 lowers tl.extra.cuda.gdc_wait / gdc_launch_dependents to a scalar asm that every thread runs: fine
_GDC_ASM = re.compile(r'=\s*tt\.elementwise_inline_asm\s+"griddepcontrol\.(wait|launch_dependents);[^"]*"[^\n]*->\s*i32\b')


def _ints(spec: str, key: str) -> Optional[list[int]]:
    m = re.search(key + r"\s*=\s*\[([0-9, ]+)\]", spec)
    return [int(v) for v in m.group(1).split(",")] if m else None


def asm_layout_problems(ttgir: str) -> list[str]:
    """Inline asm runs once per element a thread holds; a layout whose footprint (blocked: sizePerThread x
    threadsPerWarp x warpsPerCTA; nvidia_mma: instrShape x warpsPerCTA) exceeds the tensor holds some elements in
    two threads, and an asm with side effects (the threshold filter's append) would then run twice for them.
    Returns a problem per `tt.elementwise_inline_asm` whose result layout replicates or is not one of those
    (triton 3.6's scalar `griddepcontrol` asm, idempotent in every thread, is accepted)."""
    layouts = {m.group(1): (m.group(2), m.group(3)) for m in _LAYOUT_DEF.finditer(ttgir)}
    problems = []
    found = list(_ASM_LAYOUT.finditer(ttgir))
    unparsed = len(re.findall(r"=\s*tt\.elementwise_inline_asm\b", ttgir)) - len(found) - len(_GDC_ASM.findall(ttgir))
    if unparsed:
        problems.append(f"{unparsed} inline asm op(s) whose result layout could not be read: replication not checked")
    for m in found:
        shape = [int(v) for v in m.group(1).split("x")]
        kind, spec = layouts.get(m.group(2), ("?", ""))
        if kind == "blocked":
            parts = [_ints(spec, key) for key in ("sizePerThread", "threadsPerWarp", "warpsPerCTA")]
            foot = [a * b * c for a, b, c in zip(*parts)] if all(parts) else None
        elif kind == "nvidia_mma":
            w, instr = _ints(spec, "warpsPerCTA"), _ints(spec, "instrShape")
            foot = [a * b for a, b in zip(instr, w)] if w and instr else None
        else:
            foot = None
        if foot is None:
            problems.append(f"inline asm on a {kind} layout ({m.group(2)}): replication not checked")
        elif any(f > s for f, s in zip(foot, shape)):
            problems.append(f"inline asm on {kind} footprint {foot} over a {shape} tensor: elements held twice")
    return problems


def compile_case(case: Case, arch: int, fn: Any = None, cache_dir: Optional[str] = None,
                 disasm: bool = False) -> dict:
    """Compile one case for sm_<arch> (`fn`: another jit function than the named kernel; `cache_dir`:
    triton's cache for this compile; `disasm`: also count the cubin's SASS instructions, see
    `kernels.sass`); never raises: a failure is reported in the result."""
    row = dict(kernel=case.kernel, label=case.label, arch=f"sm_{arch}")
    t0 = time.perf_counter()
    try:
        compiled, log = compile_binary(case, arch, fn, cache_dir)
        row.update(ok=True, shared_bytes=int(compiled.metadata.shared), **_ptxas_resources(log))
        if "elementwise_inline_asm" in compiled.asm.get("ttgir", ""):
            row["asm_layout_problems"] = asm_layout_problems(compiled.asm["ttgir"])
        if disasm:
            from . import sass

            counts = sass.analyse(sass.disassemble(compiled.asm["cubin"])).counts()
            row.update(tensor_cores_expected=case.tensor_cores, spill_allowed=case.spill_allowed,
                       sass={k: counts[k] for k in ("instructions", "tensor_core", "tma", "wgmma",
                                                    "spill_instructions")})
    except Exception as e:  # reported, not raised: one failing config must not hide the others
        msg = str(e).strip().splitlines()
        row.update(ok=False, error=(msg[-1] if msg else type(e).__name__)[:400], error_type=type(e).__name__)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def gate(results: list[dict], spills: bool = True) -> list[str]:
    """Why CI must fail, one line per offending config (empty: pass). A config fails when it did not
    compile, when it spills registers (ptxas spill bytes or LDL/STL in its SASS) without
    `spill_allowed`, or when it should multiply on tensor cores (`tensor_cores_expected`) and its SASS
    holds no HMMA / HGMMA (wgmma) / tcgen05 MMA: only the encode kernels (sort and compact) multiply, the merge,
    edit and decode kernels never expect tensor cores. Rows need `compile_case(..., disasm=True)`. `spills=False`
    leaves spills out (they are still listed by `_summary`)."""
    problems = []
    for r in results:
        where = f"{r.get('kernel')} {r.get('arch')} [{r.get('label')}]"
        if not r.get("ok"):
            problems.append(f"{where}: did not compile: {r.get('error_type')}: {r.get('error')}")
            continue
        if "sass" not in r:
            problems.append(f"{where}: no SASS counts (compile with disasm=True)")
            continue
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        if spills and (spill or r["sass"].get("spill_instructions", 0)) and not r.get("spill_allowed"):
            problems.append(f"{where}: spills ({r.get('spill_stores', 0)} bytes stores, {r.get('spill_loads', 0)} "
                            f"bytes loads, {r['sass'].get('spill_instructions', 0)} LDL/STL) at {r.get('reg')} "
                            "registers")
        problems += [f"{where}: {p}" for p in r.get("asm_layout_problems", [])]
        if r.get("tensor_cores_expected") and not sum(r["sass"].get("tensor_core", {}).values()):
            problems.append(f"{where}: no tensor-core instruction (HMMA/HGMMA/UTC*MMA count 0) in a config whose "
                            "dtype multiplies on tensor cores")
    return problems


def run(archs: list[int], full: bool = False, jobs: int = 1, progress: bool = True,
        keep_cache: bool = False, disasm: bool = False) -> list[dict]:
    """Compile all cases for each arch (in `jobs` processes); one result dict per case."""
    work = [(c, a) for a in archs for c in cases(a, full)]
    results: list[dict] = []
    # a fresh cache unless asked: a cache hit skips ptxas, whose log gives registers and spills
    tmp = None if keep_cache else tempfile.TemporaryDirectory(prefix="snce_compile_check_")
    cache_dir = tmp.name if tmp else None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, this only guards odd installs
        tqdm = None
    bar = tqdm(total=len(work), desc="triton compile", disable=not progress) if tqdm else None
    try:
        if jobs <= 1:
            for c, a in work:
                results.append(compile_case(c, a, cache_dir=cache_dir, disasm=disasm))
                bar and bar.update()
        else:
            with ProcessPoolExecutor(jobs) as pool:
                for r in pool.map(compile_case, [c for c, _ in work], [a for _, a in work],
                                  [None] * len(work), [cache_dir] * len(work), [disasm] * len(work)):
                    results.append(r)
                    bar and bar.update()
    finally:
        bar and bar.close()
        tmp and tmp.cleanup()
    return results


def _summary(results: list[dict]) -> str:
    lines = []
    for kernel in sorted({r["kernel"] for r in results}):
        for arch in sorted({r["arch"] for r in results}):
            rows = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
            if not rows:
                continue
            ok = [r for r in rows if r["ok"]]
            regs = [r["reg"] for r in ok if "reg" in r]
            spills = [r for r in ok if r.get("spill_stores", 0)]
            lines.append(
                f"{kernel:14s} {arch}: {len(ok)}/{len(rows)} compiled"
                + (f", registers {min(regs)}-{max(regs)}" if regs else "")
                + f", {len(spills)} spilling registers"
                + f", slowest {max(r['seconds'] for r in rows):.1f} s")
    for r in results:
        if not r["ok"]:
            lines.append(f"FAILED {r['kernel']} {r['arch']} [{r['label']}]: {r['error_type']}: {r['error']}")
        elif r.get("spill_stores", 0):
            lines.append(f"spill  {r['kernel']} {r['arch']} [{r['label']}]: {r.get('reg')} registers, "
                         f"{r['spill_stores']} bytes spill stores, {r.get('spill_loads', 0)} bytes spill loads")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snce_fast.kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(ARCHS),
                    help="compute capabilities to compile for (default: 90, H100/H200)")
    ap.add_argument("--full", action="store_true", help="also every autotuning candidate and more shapes")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--json", help="write every result row to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use triton's normal cache (faster reruns; cached kernels report no registers)")
    ap.add_argument("--gate", action="store_true",
                    help="also disassemble every cubin and exit 1 when a default config spills registers (unless "
                         "its table says no tile fits) or lost its tensor-core instructions (the CI gate)")
    ap.add_argument("--allow-spills", action="store_true",
                    help="with --gate: report spills but do not fail on them (CI's pass with another triton version, "
                         "whose ptxas allocates registers differently: compile errors, lost tensor cores and asm "
                         "layouts still fail)")
    args = ap.parse_args(argv)
    if args.allow_spills and not args.gate:
        ap.error("--allow-spills needs --gate")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # kernels decorated under the interpreter cannot be compiled: rerun without it
        env = dict(os.environ, TRITON_INTERPRET="0")
        args_out = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "snce_fast.kernels.compile_check", *args_out], env=env)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    import torch
    import triton

    results = run(args.arch, args.full, args.jobs, progress=not args.quiet, keep_cache=args.keep_cache,
                  disasm=args.gate)
    print(_summary(results))
    problems = gate(results, spills=not args.allow_spills) if args.gate else []
    if args.gate:
        allowed = [r for r in results if r.get("ok") and r.get("spill_allowed") and r.get("spill_stores", 0)]
        print(f"gate: {len(results)} configs, {len(problems)} failing"
              + (f"; {len(allowed)} spill where allowed (no tile within the table's budget, the opt-in compact "
                 "kernel's int64 offsets, or the threshold tails' mixed-dtype overflow path)" if allowed else ""))
        for p in problems:
            print(f"GATE FAIL {p}")
    if args.json:
        from snce_fast.records.atomic import atomic_write_text

        from snce_fast.records.run_info import metadata

        meta = metadata(torch.device("cpu"))
        meta.update(mode="compile-only", triton=triton.__version__,
                    note="ahead-of-time compile with triton + ptxas on a machine without a GPU: registers and "
                         "spills are ptxas's static numbers; nothing here ran on a GPU")
        atomic_write_text(args.json, json.dumps(dict(meta=meta, archs=[f"sm_{a}" for a in args.arch],
                                                     results=results), indent=1))
    return 0 if all(r["ok"] for r in results) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
