"""The CI gate (`compile_check --gate`), the SASS reader (`kernels.sass`) and the static cost report's
replay of the encode kernel's branch decisions (`kernels.cost_report`). CPU only, no compile here."""
import math

import numpy as np
import pytest

pytest.importorskip("triton")

from snce_fast.kernels import sass  # noqa: E402
from snce_fast.kernels.compile_check import gate  # noqa: E402
from snce_fast.kernels.cost_report import classify_paths, occupancy, replay_encode_decisions  # noqa: E402

# A tile loop (.L_x_1 .. back-branch) holding an MMA loop (.L_x_2), a branch to a long "sort" block, and an
# insertion loop (.L_x_5), in nvdisasm -c's format.
SYNTHETIC = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   IMAD R2, R0, 0x4, RZ ;
.L_x_2:
        /*0020*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0050*/               @P0 BRA `(.L_x_2) ;
        /*0060*/                   ISETP.GT.AND P1, PT, R8, R3, PT ;
        /*0070*/               @!P1 BRA `(.L_x_3) ;
        /*0080*/                   ISETP.GT.AND P2, PT, R9, 0x8, PT ;
        /*0090*/               @P2 BRA `(.L_x_4) ;
.L_x_5:
        /*00a0*/                   SHFL.BFLY PT, R10, R8, 0x1, 0x1f ;
        /*00b0*/                   SEL R11, R10, R8, P1 ;
        /*00c0*/               @P3 BRA `(.L_x_5) ;
        /*00d0*/                   BRA `(.L_x_3) ;
.L_x_4:
        /*00e0*/                   SEL R11, R10, R8, P1 ;
        /*00f0*/                   SEL R12, R10, R8, P1 ;
        /*0100*/                   SHFL.BFLY PT, R10, R8, 0x1, 0x1f ;
        /*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0120*/                   ISETP.GT.AND P2, PT, R9, 0x8, PT ;
        /*0130*/                   SEL R13, R10, R8, P1 ;
.L_x_3:
        /*0140*/                   IADD3 R0, R0, 0x80, RZ ;
        /*0150*/               @P4 BRA `(.L_x_1) ;
        /*0160*/                   STG.E.64 desc[UR4][R2.64], R8 ;
        /*0170*/                   EXIT ;
.L_x_6:
        /*0180*/                   BRA `(.L_x_6);
"""


def test_sass_parser_finds_loops_and_paths():
    an = sass.analyse(SYNTHETIC)
    c = an.counts()
    assert c["instructions"] == 25 and c["tensor_core"] == {"HMMA": 2} and c["wgmma"] == 0
    loops = an.loop_table()
    assert [(lp["head"], lp["latch"], lp["depth"]) for lp in loops] == [
        ("0x10", "0x150", 0), ("0x20", "0x50", 1), ("0xa0", "0xc0", 1)]  # the trap `BRA .L_x_6` is no loop
    paths = classify_paths(an)
    assert paths["mma_loop"]["tensor_core"] == 2 and paths["mma_loop"]["instructions"] == 4
    assert paths["insert_loop"]["instructions"] == 3
    p = paths["paths"]
    # skip: IMAD + ISETP/BRA + IADD3/BRA; sort adds the second test and the 6-instruction block
    assert p["skip"]["instructions"] == 5
    assert p["sort"]["instructions"] == 13 and p["sort"]["mix"]["barrier"] == 1 and p["sort"]["mix"]["shuffle"] == 1
    assert p["insert"]["instructions"] == 8  # the insertion loop's body is counted per iteration separately


def test_gate_fails_on_spill_and_on_missing_tensor_cores():
    ok = dict(kernel="encode_topk", label="bf16", arch="sm_90", ok=True, reg=212, spill_stores=0, spill_loads=0,
              tensor_cores_expected=True, spill_allowed=False,
              sass=dict(tensor_core={"HMMA": 16}, spill_instructions=0))
    assert gate([ok]) == []
    spill = dict(ok, spill_stores=96, spill_loads=96)
    (msg,) = gate([spill])
    assert "spills" in msg and "96" in msg
    assert gate([dict(spill, spill_allowed=True)]) == []  # a default the table says cannot fit
    ldl = dict(ok, sass=dict(ok["sass"], spill_instructions=4))
    assert len(gate([ldl])) == 1  # LDL/STL in the SASS count too
    no_tc = dict(ok, sass=dict(ok["sass"], tensor_core={}))
    (msg,) = gate([no_tc])
    assert "tensor-core" in msg
    fp32 = dict(no_tc, tensor_cores_expected=False)  # exact fp32 path: no tensor cores expected
    assert gate([fp32]) == []
    assert len(gate([dict(ok=False, kernel="k", label="l", arch="sm_90", error_type="E", error="boom")])) == 1
    assert len(gate([ok, spill, no_tc])) == 2
    assert gate([ok, spill, no_tc], spills=False) == gate([no_tc])  # --allow-spills: only the spill is let through


def test_occupancy_from_registers():
    assert occupancy(212, 8, 61440)["ctas_per_sm"] == 1  # 216 x 32 x 8 registers: one program fits 64K
    o = occupancy(32, 4, 16384)
    assert o["ctas_per_sm"] == 13 and o["limited_by"] == "shared"  # 228 KB / 17 KB


def _reference_replay(x, W, bias, k, BM, BN, splits, chunk, few, bug):
    """Per program, per tile, the kernel's decisions in plain Python loops."""
    M, n = x.shape[0], W.shape[1]
    KP = 1 << max(0, (k - 1).bit_length())
    pre_all = (x @ W + bias).astype(np.float32)
    rb = -(-M // BM)
    out = {}
    for i in range(rb):
        rows = range(i * BM, min(M, i * BM + BM))
        for s in range(splits):
            tops = {r: [] for r in rows}
            thr = {r: -math.inf for r in rows}
            for t, c0 in enumerate(range(s * chunk, min(n, s * chunk + chunk), BN)):
                cols = range(c0, min(c0 + BN, s * chunk + chunk, n))
                counts, acc = [], []
                for r in rows:
                    cand = [pre_all[r, c] for c in cols if pre_all[r, c] > thr[r]]
                    new = sorted(tops[r] + cand, reverse=True)[:KP]
                    acc.append(sum(v >= new[-1] for v in cand) if cand else 0)
                    counts.append(len(cand))
                    tops[r] = new
                    kth = new[-1] if len(new) == KP else -math.inf
                    thr[r] = -math.inf if bug and kth <= -2.0 else kth
                nc = max(counts)
                out[i, s, t] = (0 if nc == 0 else 1 if nc <= few else 2, max(acc) if 0 < nc <= few else 0)
    return out


@pytest.mark.parametrize("bug", [True, False])
def test_replay_matches_a_plain_loop_reference(bug):
    rng = np.random.default_rng(0)
    M, d, n, k, BM, BN, few = 10, 8, 96, 4, 4, 16, 2
    x = rng.standard_normal((M, d)).astype(np.float32)
    W = rng.standard_normal((d, n)).astype(np.float32)
    bias = (rng.standard_normal(n) - 3.0).astype(np.float32)  # many values <= -2.0: exercises the sentinel bug
    splits, chunk = 2, 48
    rep = replay_encode_decisions(x, W, bias, k, BM, BN, splits, chunk, few, sentinel_bug=bug)
    ref = _reference_replay(x, W, bias, k, BM, BN, splits, chunk, few, bug)
    for (i, s, t), (code, ins) in ref.items():
        assert rep["codes"][i, s, t] == code, (i, s, t)
        assert rep["inserts"][i, s, t] == ins, (i, s, t)
    assert (rep["codes"] >= 0).sum() == len(ref)


def test_replay_sentinel_bug_sends_tiles_to_the_sort_path():
    """With every pre-activation <= -2 the buggy threshold stays -inf: every tile takes the sort path."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 4)).astype(np.float32) * 0.01
    W = rng.standard_normal((4, 64)).astype(np.float32)
    bias = np.full(64, -5.0, dtype=np.float32)
    bug = replay_encode_decisions(x, W, bias, 2, 8, 16, 1, 64, 2, sentinel_bug=True)["codes"]
    fixed = replay_encode_decisions(x, W, bias, 2, 8, 16, 1, 64, 2, sentinel_bug=False)["codes"]
    assert (bug == 2).all()
    assert (fixed[..., 1:] != 2).any()


def test_compile_check_gate_flag_sets_the_exit_code(monkeypatch, capsys):
    """`compile_check --gate` (what .ci/run calls) exits 1 on a spilling row and 0 on clean rows."""
    from snce_fast.kernels import compile_check as cc

    clean = dict(kernel="encode_topk", label="bf16 k64", arch="sm_90", ok=True, reg=212, spill_stores=0,
                 spill_loads=0, seconds=1.0, tensor_cores_expected=True, spill_allowed=False,
                 sass=dict(tensor_core={"HMMA": 16}, spill_instructions=0))
    seen = {}

    def fake_run(archs, full=False, jobs=1, progress=True, keep_cache=False, disasm=False):
        seen["disasm"] = disasm
        return rows

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cc, "run", fake_run)
    rows = [clean]
    assert cc.main(["--gate", "--quiet", "--jobs", "1"]) == 0 and seen["disasm"] is True
    rows = [clean, dict(clean, label="bf16 k256", spill_stores=96)]
    assert cc.main(["--gate", "--quiet", "--jobs", "1"]) == 1
    assert "GATE FAIL encode_topk sm_90 [bf16 k256]: spills" in capsys.readouterr().out
    assert cc.main(["--quiet", "--jobs", "1"]) == 0  # without --gate spills are reported, not failed


def test_benchmark_tune_candidates_limit(monkeypatch):
    """`--tune-candidates N` of the kernel benchmarks (scripts/gpu_session.sh's quick set) makes
    `kernels.tune` time at most N configs, the default first."""
    import os
    import sys

    from snce_fast.kernels import _tuning

    monkeypatch.setattr(_tuning, "encode_candidates", _tuning.encode_candidates)  # restored after the test
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    full = _tuning.encode_candidates(77, 64, "hopper", 2)
    assert len(full) > 2
    _common.limit_tuning(2)
    _common.limit_tuning(2)  # twice: still the first two of the full list
    assert _tuning.encode_candidates(77, 64, "hopper", 2) == full[:2]
    with pytest.raises(SystemExit):
        _common.limit_tuning(0)


def test_benchmark_paths_and_agreement(monkeypatch):
    """The benchmarks' `with_select` runs a call under a selection path and filter grid and restores both (also
    when the call raises); `topk_agreement` records how a fused result differs from the reference."""
    import importlib
    import os
    import sys

    import torch

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")
    thr_mod = importlib.import_module("snce_fast.kernels.encode_threshold")
    monkeypatch.setattr(encode_mod, "SELECT", "sort")
    monkeypatch.setattr(thr_mod, "GRID", "tiles")
    monkeypatch.setattr(thr_mod, "PDL", True)
    seen = _common.with_select("threshold", lambda: (encode_mod.SELECT, thr_mod.GRID, thr_mod.PDL), "persistent",
                               pdl=False)()
    assert seen == ("threshold", "persistent", False)
    assert (encode_mod.SELECT, thr_mod.GRID, thr_mod.PDL) == ("sort", "tiles", True)

    def boom():
        raise RuntimeError("x")
    with pytest.raises(RuntimeError):
        _common.with_select("compact", boom, "persistent")()
    assert (encode_mod.SELECT, thr_mod.GRID) == ("sort", "tiles")

    v = torch.tensor([[3.0, 2.0, 1.0, 0.5], [4.0, 3.0, 2.0, 1.0]])
    i = torch.tensor([[7, 1, 4, 2], [0, 1, 2, 3]], dtype=torch.int32)
    assert _common.topk_agreement((v, i), (v, i.long())) == {"max_value_err": 0.0, "index_overlap": 1.0}
    i2, v2 = i.clone(), v.clone()
    i2[0, 3], v2[1, 0] = 9, 4.25  # one index of 8 differs; one value off by 0.25
    got = _common.topk_agreement((v2, i2), (v, i))
    assert got == {"max_value_err": 0.25, "index_overlap": 7 / 8}


def test_benchmarks_record_a_failing_path_on_a_gpu_and_raise_on_the_cpu(monkeypatch, capsys):
    """A first GPU session must not lose every row to one broken implementation: on a GPU `time_impls` and
    `record_agreement` record the error in its row (and print it); on the CPU the error propagates."""
    import os
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    def broken():
        raise RuntimeError("no kernel image")
    impls = {"good": lambda: 1.0, "broken": broken}
    with pytest.raises(RuntimeError, match="no kernel image"):
        _common.time_impls(impls, {"prompts": 1}, reps=1)
    monkeypatch.setattr(_common, "ON_GPU", True)
    monkeypatch.setattr(_common, "bench", lambda fn, warmup, reps: (fn(), 0.002)[1])
    rows = _common.time_impls(impls, {"prompts": 1}, reps=1)
    assert rows[0]["ms"] == 2.0 and "error" not in rows[0]
    assert rows[1]["ms"] is None and rows[1]["error"] and "RuntimeError: no kernel image" in rows[1]["skip"]
    assert "ERROR broken" in capsys.readouterr().err
    rows[1]["ms"] = 1.0  # timed, but the agreement check fails
    _common.record_agreement(rows, impls, ("good", "broken"), lambda out: {"value": out})
    assert rows[0]["vs_reference"] == {"value": 1.0} and "RuntimeError" in rows[1]["vs_reference"]


def test_cost_report_tables_of_the_committed_reports(capsys, tmp_path):
    """`cost_report --tables` re-prints the docs tables from the committed JSON; a bad file is a one-line error."""
    import os

    from snce_fast.kernels import cost_report

    root = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")
    files = [os.path.join(root, f"cost_report_sm{a}.json") for a in (90, 100)]
    assert cost_report.main(["--tables", *files]) == 0
    out = capsys.readouterr().out
    assert "| random_spec (d 768, n 32768, k 64) | 16 |" in out and "HMMA" in out and "0 fail the gate" in out
    assert cost_report.main(["--tables", str(tmp_path / "missing.json")]) == 2
    assert "cannot read report" in capsys.readouterr().err


def test_gate_expectations_of_the_default_cases():
    """The gate expects tensor cores exactly where an encode kernel's x is 16-bit (16-bit tiles, or tf32 with an fp32
    W_enc; merge, edit and decode kernels do not multiply), and allows spills only where the tile table has no
    config within its no-spill budget (k 256), in the opt-in compact kernel with int64 offsets, and in the threshold
    path's tails with mixed dtypes."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json\nfrom snce_fast.kernels.compile_check import cases\n"
            "print(json.dumps([[c.kernel, c.pointers, c.constexprs.get('KP'), c.constexprs.get('WIDE'),"
            " c.tensor_cores, c.spill_allowed]"
            " for c in cases(90)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r[0] for r in rows} >= {"encode_topk", "encode_compact", "merge_topk", "edit_keys"}
    for kernel, ptrs, kp, wide, tc, spill_ok in rows:
        encode = kernel in ("encode_topk", "encode_compact")
        matmul = encode or kernel in ("threshold", "threshold_filter")
        # 16-bit x runs on tensor cores: in its own dtype with a 16-bit W_enc, as tf32 with an fp32 one
        sixteen = matmul and ptrs["x_ptr"] in ("float16", "bfloat16")
        assert tc == sixteen, (kernel, ptrs)
        # the threshold tails keep 4-8 bytes on the stack with 16-bit x and an fp32 W_enc (the overflow path)
        mixed_tail = kernel in ("threshold_select", "threshold_edit") and ptrs["x_ptr"] != ptrs["w_ptr"]
        assert spill_ok == (encode and kp == 256 or kernel == "encode_compact" and wide or mixed_tail), (
            kernel, ptrs, kp)


def test_guarded_instructions_counts_the_append_path_once():
    """The threshold model's append path: what a forward branch skips when the skipped range holds an ATOMG
    (outermost ranges; the inner bound check's branch to the same label is not counted twice)."""
    text = """
        /*0000*/                   FSETP.GEU.AND P1, PT, R3, R4, PT ;
        /*0010*/               @!P1 BRA `(.L_x_3) ;
        /*0020*/                   IMAD.MOV.U32 R5, RZ, RZ, 0x1 ;
        /*0030*/                   ATOMG.E.ADD.STRONG.GPU PT, R6, desc[UR4][R8.64], R5 ;
        /*0040*/                   ISETP.GE.U32.AND P2, PT, R6, UR6, PT ;
        /*0050*/               @P2 BRA `(.L_x_3) ;
        /*0060*/                   STG.E.64 desc[UR4][R10.64], R2 ;
.L_x_3:
        /*0070*/                   BSYNC B0 ;
        /*0080*/               @P3 BRA `(.L_x_4) ;
        /*0090*/                   FADD R1, R1, R2 ;
.L_x_4:
        /*00a0*/                   EXIT ;
"""
    instrs, labels = sass.parse(text)
    assert sass.guarded_instructions(instrs, labels, "ATOMG") == 5  # 0x20..0x60; the FADD skip holds no atomic
    assert sass.guarded_instructions(instrs, labels, "HMMA") == 0


def test_count_tail_launches_runs_without_a_gpu():
    """The sort path's launch count (a subprocess with every Triton launch stubbed): the encode kernel and the
    merge kernel, no aten op."""
    from snce_fast.kernels.cost_report import count_tail_launches

    assert count_tail_launches() == (2, ["_merge_topk_kernel"])
