"""Ahead-of-time GPU compilation of the Triton kernels (snce_fast.kernels.compile_check).

The interpreter accepts code the real compiler rejects, so these tests run triton's real
compiler for sm_90 in a subprocess without TRITON_INTERPRET (no GPU needed) and check
that the tool both passes real kernels and reports a broken one.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from snce_fast.kernels.compile_check import KERNELS  # noqa: E402
from snce_fast.kernels._tuning import (  # noqa: E402
    NO_SPILL_ELEMENTS, NO_SPILL_ELEMENTS_FP32, TUNE_MAX_ELEMENTS, encode_candidates, elements_per_thread,
)


def _run(code: str, tmp_path) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("M", [1, 77, 1232, 19712])
@pytest.mark.parametrize("KP", [1, 2, 32, 64, 256])
def test_default_configs_stay_in_the_register_budget(M, KP):
    for cls, itemsize in (("hopper", 2), ("ampere-dc", 2), ("blackwell", 2), ("default", 2), ("hopper", 4)):
        cands = encode_candidates(M, KP, cls, itemsize)
        budget = NO_SPILL_ELEMENTS if itemsize == 2 else NO_SPILL_ELEMENTS_FP32
        first = cands[0]
        assert first.BN >= KP and first.BM >= 16 and first.BM <= max(16, 1 << (M - 1).bit_length())
        # the default never spills unless no tile at all fits (only KP 256: 16 x 256 is the floor)
        fits = elements_per_thread(first.BM, first.BN, KP, first.num_warps) <= budget
        assert fits or (len(cands) == 1 and first.BM == 16)
        assert all(elements_per_thread(c.BM, c.BN, KP, c.num_warps) <= TUNE_MAX_ELEMENTS for c in cands[1:])
        assert len(set(cands)) == len(cands)


def test_cases_cover_every_kernel_and_dtype(tmp_path):
    rows = _run("""
        import json
        from snce_fast.kernels.compile_check import cases
        print(json.dumps([[c.kernel, c.pointers] for c in cases(90)]))
    """, tmp_path)
    kernels = {k for k, _ in rows}
    assert kernels == set(KERNELS)
    for kernel in kernels:
        dtypes = {p.get("x_ptr", p.get("v_ptr")) for k, p in rows if k == kernel}
        assert dtypes == {"bfloat16", "float16", "float32"}, (kernel, dtypes)


def test_real_kernels_compile_for_sm90(tmp_path):
    """The docs/performance.md default shape (bf16, k 64, one prompt) of the encode kernel and one config of each other
    kernel through ptxas: they compile, and ptxas reports no register spills (the tile budget's claim). The opt-in
    compact kernel (minutes per compile here) is left to `compile_check --gate` and the Inductor test below."""
    res = _run("""
        import json
        from snce_fast.kernels import compile_check as cc
        picked = {}
        for c in cc.cases(90):
            bf16 = c.pointers.get("x_ptr", c.pointers.get("v_ptr")) == "bfloat16"
            spec_shape = c.kernel != "encode_topk" or (c.constexprs["KP"] == 64 and c.ints["M"] == 77
                                                       and c.ints["N"] == 32768)
            if bf16 and spec_shape and c.kernel not in picked and c.kernel != "encode_compact":
                picked[c.kernel] = c
        print(json.dumps([cc.compile_case(c, 90) for c in picked.values()]))
    """, tmp_path)
    assert {r["kernel"] for r in res} == set(KERNELS) - {"encode_compact"}
    for r in res:
        assert r["ok"], r
        assert r["arch"] == "sm_90"
        assert 0 < r["reg"] <= 255 and r["spill_stores"] == 0, r


def test_a_kernel_the_interpreter_accepts_is_reported_when_it_does_not_compile(tmp_path):
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad(x_ptr, N, B: tl.constexpr):
            for s in tl.static_range(2):
                w: tl.constexpr = B * (s + 1)  # reassigning a constexpr: fine in Python, not in the compiler
                cols = tl.arange(0, B)
                tl.store(x_ptr + cols, tl.load(x_ptr + cols, mask=cols < N) * w, mask=cols < N)
    """))
    res = _run(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from bad_kernel import bad
        from snce_fast.kernels.compile_check import Case, compile_case
        case = Case("bad", "bad", dict(x_ptr="float32"), dict(N=100), constexprs=dict(B=128))
        print(json.dumps(compile_case(case, 90, fn=bad)))
    """, tmp_path)
    assert res["ok"] is False
    assert "constexpr cannot be reassigned" in res["error"], res


def test_inductor_sees_each_kernel_write_only_its_output(tmp_path):
    """torch.compile's mutation analysis runs triton's real front end on the kernels: a kernel it
    cannot parse makes Inductor assume every input is written (extra copies). A fake driver gives
    it an sm_90 target; the analysis itself needs no GPU."""
    res = _run("""
        import json
        import torch, triton
        from triton.backends.compiler import GPUTarget
        import torch._higher_order_ops.triton_kernel_wrap as tkw

        class FakeDriver:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(FakeDriver())
        analyse = getattr(tkw, "identify_accessed_tensors", None)
        if analyse is None:
            print(json.dumps({"skip": "this torch has no identify_accessed_tensors"}))
            raise SystemExit(0)
        from snce_fast.kernels import compile_check as cc

        out = {}
        for c in cc.cases(90):
            if c.kernel in out:
                continue
            kw = {name: torch.zeros(4, dtype=getattr(torch, dt)) for name, dt in c.pointers.items()}
            kw.update(c.ints)
            kw.update({name: 1.0 for name in c.floats})
            kw.update(c.constexprs)
            acc = analyse(cc._kernel(c.kernel), kw, {})
            out[c.kernel] = dict(reads=sorted(d.name for d in acc.read_writes.reads),
                                 writes=sorted(d.name for d in acc.read_writes.writes))
        print(json.dumps(out))
    """, tmp_path)
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["encode_topk"] == dict(reads=["b_ptr", "w_ptr", "x_ptr"], writes=["out_ptr"])
    assert res["sparse_decode"]["writes"] == ["o_ptr"]
    assert res["edit_residual"]["writes"] == ["o_ptr"]
    assert "o_ptr" not in res["edit_residual"]["reads"] and len(res["edit_residual"]["reads"]) == 6
    assert res["merge_topk"] == dict(reads=["key_ptr"], writes=["i_ptr", "v_ptr"])
    assert res["edit_keys"]["writes"] == ["o_ptr"] and "o_ptr" not in res["edit_keys"]["reads"]
    # Inductor traces a store's address back through the arguments of any jit helper whose result it depends on:
    # the compact kernel's compaction addresses depend on its tile, so it writes `_preact_tile`'s loop out (through
    # the helper, x, W_enc and the bias looked written: a GPU torch.compile would have copied them every call)
    assert res["encode_compact"]["writes"] == ["bi_ptr", "bv_ptr", "out_ptr"]
    assert res["threshold"]["writes"] == ["cnt_ptr", "gmax_ptr", "thr_ptr", "ticket_ptr"]
    # the filter's PTX epilogue (non-pure inline asm) defeats the analysis: every pointer looks written. Inductor
    # never analyses it: its launches run inside the opaque op snce_fast::threshold_survivors (test_survivors_op_is_opaque)
    assert res["threshold_filter"]["writes"] == ["b_ptr", "cnt_ptr", "out_ptr", "thr_ptr", "w_ptr", "x_ptr"]
    assert res["threshold_select"]["writes"] == ["i_ptr", "v_ptr"]
    assert res["threshold_edit"]["writes"] == ["o_ptr"]


def test_kernel_source_as_inductor_re_emits_it_compiles(tmp_path):
    """Under torch.compile, Inductor does not call our kernels: it re-emits each one's source plus
    its jit / constexpr dependencies into a new module (by name) and compiles that. Rebuild that
    module the way Inductor does and compile it for sm_90: a dependency Inductor cannot re-emit
    (an alias, a helper using triton's private `core.`) fails here instead of on a GPU."""
    res = _run(f"""
        import importlib.util, json, sys
        from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
        from snce_fast.kernels import compile_check as cc

        picked = {{}}
        for c in cc.cases(90):
            if c.kernel not in picked and c.pointers.get("x_ptr", c.pointers.get("v_ptr")) == "bfloat16":
                picked[c.kernel] = c
        rows = []
        for name, case in picked.items():
            kernel = cc._kernel(name)
            src = ("import triton\\nimport triton.language as tl\\n\\n@triton.jit\\n"
                   + user_defined_triton_kernel_transitive_closure_source_code(kernel))
            path = {str(tmp_path)!r} + f"/emitted_{{name}}.py"
            open(path, "w").write(src)
            spec = importlib.util.spec_from_file_location(f"emitted_{{name}}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            rows.append(cc.compile_case(case, 90, fn=getattr(mod, kernel.fn.__name__)))
        print(json.dumps(rows))
    """, tmp_path)
    assert {r["kernel"] for r in res} == set(KERNELS)
    for r in res:
        assert r["ok"], r


def test_survivors_op_is_opaque_on_a_gpu_too(monkeypatch):
    """`register_op(opaque=True)` makes a `custom_op` (Inductor does not trace into it) where a plain registration
    makes a `triton_op` on a GPU; the threshold path's two matmul launches are registered that way."""
    import importlib
    import uuid

    import torch
    from torch._library.custom_ops import CustomOpDef

    reg = importlib.import_module("snce_fast.kernels._registry")
    monkeypatch.setattr(reg, "interpreting", lambda: False)  # as on a GPU
    monkeypatch.setattr(reg, "triton_op", lambda name, mutates_args: (lambda fn: ("triton_op", name)))
    monkeypatch.setattr(reg, "OPAQUE_OPS", set(reg.OPAQUE_OPS))

    def fake(x):
        return torch.empty_like(x)

    def body(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    ns = f"snce_fast_test_{uuid.uuid4().hex[:8]}"  # a fresh namespace: the test can run twice in one process
    assert reg.register_op(f"{ns}::traced", fake)(body) == ("triton_op", f"{ns}::traced")
    opaque = reg.register_op(f"{ns}::opaque", fake, opaque=True)(body)
    assert isinstance(opaque, CustomOpDef) and f"{ns}::opaque" in reg.OPAQUE_OPS
    assert torch.equal(getattr(torch.ops, ns).opaque(torch.arange(3.0)), torch.arange(3.0))
    importlib.import_module("snce_fast.kernels.encode_threshold")
    assert "snce_fast::threshold_survivors" in reg.OPAQUE_OPS


def test_asm_layout_problems_flags_replicated_elements():
    """The gate's check that an inline asm (the threshold filter's append) runs once per element: a layout whose
    footprint exceeds the tensor holds elements in two threads."""
    from snce_fast.kernels.compile_check import asm_layout_problems

    def ttgir(layout: str, shape: str) -> str:
        return (f"#l = #ttg.{layout}\n"
                f'%1 = tt.elementwise_inline_asm "{{ mov.u32 $0, 0; }}" {{constraints = "=r,r"}} %0 : '
                f"tensor<{shape}xi32, #l> -> tensor<{shape}xi32, #l> loc(#loc1)\n")

    mma = "nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [16, 1], instrShape = [16, 128, 16]}>"
    blocked = "blocked<{sizePerThread = [4, 4], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>"
    assert asm_layout_problems(ttgir(mma, "256x128")) == []
    assert "held twice" in asm_layout_problems(ttgir(mma, "128x128"))[0]
    assert asm_layout_problems(ttgir(blocked, "64x64")) == []
    assert "held twice" in asm_layout_problems(ttgir(blocked, "16x64"))[0]
    assert "not checked" in asm_layout_problems(ttgir("linear<{register = [[0, 1]]}>", "64x64"))[0]
    inline = ttgir(mma, "256x128").replace("#l>", "#ttg.nvidia_mma<{warpsPerCTA = [16, 1]}>>")  # no alias to read
    assert "could not be read" in asm_layout_problems(inline)[0]
    # triton 3.6 lowers gdc_wait / gdc_launch_dependents to a scalar asm: accepted; any other scalar asm is not
    gdc = '%1 = tt.elementwise_inline_asm "griddepcontrol.wait; // dummy $0" {constraints = "=r", pure = false} -> i32\n'
    assert asm_layout_problems(gdc) == [] and asm_layout_problems(gdc + ttgir(mma, "256x128")) == []
    assert "could not be read" in asm_layout_problems(gdc.replace("griddepcontrol.wait", "membar.gl"))[0]


def test_the_real_filter_asm_is_parsed_and_runs_once_per_element(tmp_path):
    """The gate's parser on what triton really emits for the threshold filter (sm_90, the 16-prompt tile)."""
    res = _run("""
        import json, re
        import torch
        from snce_fast.kernels import compile_check as cc

        case = [c for c in cc.threshold_case(90, torch.bfloat16, torch.bfloat16, 64, 16 * cc.PROMPT_TOKENS)
                if c.kernel == "threshold_filter"][0]
        ttgir = cc.compile_binary(case, 90)[0].asm["ttgir"]
        print(json.dumps(dict(parsed=len(cc._ASM_LAYOUT.findall(ttgir)),
                              ops=len(re.findall(r"=\\s*tt\\.elementwise_inline_asm\\b", ttgir)),
                              problems=cc.asm_layout_problems(ttgir))))
    """, tmp_path)
    assert res == dict(parsed=1, ops=1, problems=[])


def test_filter_waits_for_the_thresholds_only_after_its_matmul(tmp_path):
    """Programmatic dependent launch (sm_90, the 16-prompt tiles, both grids): the sampling kernel lets the filter
    start once its maxima are stored, before its ticket and sort; the filter's wait (ACQBULK) comes after its
    last tensor-core instruction and before its first atomic, so its matmul overlaps the sort and nothing reads a
    threshold or touches a count before the sampling launch is complete."""
    res = _run("""
        import json, re
        import torch
        from snce_fast.kernels import compile_check as cc, sass

        out = {}
        for persistent in (False, True):
            for c in cc.threshold_case(90, torch.bfloat16, torch.bfloat16, 64, 16 * cc.PROMPT_TOKENS,
                                       persistent=persistent):
                if c.kernel not in ("threshold", "threshold_filter"):
                    continue
                compiled = cc.compile_binary(c, 90)[0]
                ptx = compiled.asm["ptx"]
                ops = [i.op.split(".")[0] for i in sass.analyse(sass.disassemble(compiled.asm["cubin"])).instrs]
                where = lambda name: [k for k, op in enumerate(ops) if op == name]
                out[c.kernel + (" persistent" if persistent else "")] = dict(
                    trigger=ptx.count("griddepcontrol.launch_dependents"), wait=ptx.count("griddepcontrol.wait"),
                    trigger_before_ticket=0 <= ptx.find("griddepcontrol.launch_dependents")
                    < re.search(r"atom\\.global[.\\w]*acq_rel", ptx).start() if "acq_rel" in ptx else None,
                    acq=where("ACQBULK"), hgmma=where("HGMMA"), atom=where("ATOMG"), ldgsts=where("LDGSTS"))
        print(json.dumps(out))
    """, tmp_path)
    for name in ("threshold", "threshold persistent"):
        r = res[name]
        assert r["trigger"] == 1 and r["wait"] == 0 and r["trigger_before_ticket"], r
    for name in ("threshold_filter", "threshold_filter persistent"):
        r = res[name]  # one wait (the persistent grid's first tile), after that tile's MMAs, before any atomic
        assert r["trigger"] == 0 and r["wait"] == 1 and len(r["acq"]) == 1 and r["hgmma"] and r["atom"], r
        assert r["hgmma"][0] < r["acq"][0] < min(r["atom"]), r
    assert max(res["threshold_filter"]["hgmma"]) < res["threshold_filter"]["acq"][0]
    # the persistent loop after the first tile is still pipelined with cp.async (a wait inside the flattened loop
    # made triton 3.9 drop every LDGSTS): more of them than the one-tile kernel, and after the wait
    per, one = res["threshold_filter persistent"], res["threshold_filter"]
    assert len(per["ldgsts"]) > len(one["ldgsts"]) > 0 and max(per["ldgsts"]) > per["acq"][0], (per, one)
