"""`snce-fast bench` and snce_fast.benchmarking: rows, JSON record, CPU labelling, bad inputs."""
import json
import time

import pytest

from snce_fast import benchmarking
from snce_fast.cli import main


def test_time_fn_is_a_median_of_wall_times():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01 if len(calls) != 4 else 0.2)  # one slow outlier among the timed reps

    t = benchmarking.time_fn(fn, warmup=1, reps=5, cuda=False)
    assert len(calls) == 6
    assert 0.009 <= t < 0.1


def test_bench_cpu_writes_rows_and_labels_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--ops", "decode,histogram", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CPU MODE" in printed and "GPU numbers need a CUDA GPU" in printed
    rec = json.loads(out.read_text())
    assert rec["mode"] == "cpu" and rec["device"].startswith("CPU") and rec["date"] and rec["torch"]
    rows = rec["results"]
    assert {r["op"] for r in rows} == {"decode", "histogram"}
    assert {r["prompts"] for r in rows} == {1, 4}
    for op in ("decode", "histogram"):
        for p in (1, 4):
            fast = next(r for r in rows if r["op"] == op and r["prompts"] == p and r["impl"] == "snce_fast")
            ref = next(r for r in rows if r["op"] == op and r["prompts"] == p and r["impl"] == "reference")
            assert fast["ms"] > 0 and ref["ms"] > 0
            assert fast["speedup"] == pytest.approx(ref["ms"] / fast["ms"])
            assert fast["pct_peak"] is None  # no peak is claimed for a CPU
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_rows_name_the_backend_that_ran():
    rows = benchmarking.run(("encode",), quick=True, device="cpu")
    assert {r.backend for r in rows} <= {"reference", "cpp", "triton"}
    assert all(r.tflops and r.tflops > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--ops", "encode,bogus"], "--ops"),
    (["--threads", "0"], "--threads 0"),
])
def test_bench_bad_inputs(argv, message, capsys):
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
