"""The tuner's bookkeeping (kernels/_tuning.py) on the CPU: a fake H100 and a fake clock stand in
for the GPU timing, which is the only part that needs one."""
import contextlib
import json

import pytest
import torch

pytest.importorskip("triton")

from snce_fast.kernels import _tuning as T  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
CUDA = torch.device("cuda", 0)  # only a device description: nothing is allocated on it


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A tuner that believes it runs on an H100; `clock[cfg]` is each config's time, `timed` what was timed."""
    state = {"clock": {}, "timed": [], "fail": set()}
    monkeypatch.setenv("SNCE_FAST_TUNE_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(T, "_TUNED", {})
    monkeypatch.setattr(T, "_LOADED", False)
    monkeypatch.setattr(T, "interpreting", lambda: False)
    monkeypatch.setattr(T, "_device_key", lambda device: (H100, 132))
    monkeypatch.setattr(T, "_on", lambda device: contextlib.nullcontext())

    def run(cfg):
        if cfg in state["fail"]:
            raise RuntimeError(f"out of resources: shared memory for BM{cfg.BM}")
        state["last"] = cfg

    def cuda_ms(fn, device, reps):
        fn()
        state["timed"].append(state["last"])
        return state["clock"].get(state["last"], 1.0)

    monkeypatch.setattr(T, "_cuda_ms", cuda_ms)
    state["run"] = run
    return state


def _cands(M=77, KP=64):
    return T.encode_candidates(M, KP, "hopper", 2)


def test_the_fastest_config_is_cached_and_then_used(fake_gpu, tmp_path):
    cands = _cands()
    assert len(cands) >= 3
    fake_gpu["clock"] = {c: 2.0 for c in cands}
    fake_gpu["clock"][cands[2]] = 0.5
    best = T.tune_encode(fake_gpu["run"], 77, 32768, 768, 64, torch.bfloat16, CUDA)
    assert best == cands[2] and fake_gpu["timed"] == cands
    assert T.encode_config(77, 32768, 768, 64, torch.bfloat16, CUDA) == cands[2]
    assert T.encode_config(77, 32768, 768, 64, torch.float16, CUDA) == cands[0]  # other dtype: untuned default
    # same bucket again: kept, not timed; force: timed again
    fake_gpu["timed"].clear()
    assert T.tune_encode(fake_gpu["run"], 100, 32768, 768, 64, torch.bfloat16, CUDA) == cands[2]
    assert fake_gpu["timed"] == []
    fake_gpu["clock"][cands[1]] = 0.1
    assert T.tune_encode(fake_gpu["run"], 77, 32768, 768, 64, torch.bfloat16, CUDA, force=True) == cands[1]
    # written to disk under a versioned key, and read back by a fresh process
    on_disk = json.loads((tmp_path / "tuning.json").read_text())
    assert list(on_disk) == [f"encode|v{T.TUNE_VERSION}|{H100}|M128|n32768|d768|kp64|bfloat16"]
    T._TUNED.clear()
    T._LOADED = False
    assert T.encode_config(77, 32768, 768, 64, torch.bfloat16, CUDA) == cands[1]


def test_a_cached_choice_from_an_older_tuner_version_is_ignored(fake_gpu, monkeypatch):
    cands = _cands()
    fake_gpu["clock"] = {c: 2.0 for c in cands}
    fake_gpu["clock"][cands[-1]] = 0.5
    T.tune_encode(fake_gpu["run"], 77, 32768, 768, 64, torch.bfloat16, CUDA)
    monkeypatch.setattr(T, "TUNE_VERSION", T.TUNE_VERSION + 1)
    assert T.encode_config(77, 32768, 768, 64, torch.bfloat16, CUDA) == cands[0]


def test_failing_configs_are_reported_not_silently_skipped(fake_gpu):
    cands = _cands()
    fake_gpu["fail"] = set(cands[:2])
    with pytest.warns(RuntimeWarning, match=r"2 of \d+ candidate configs failed on NVIDIA H100.*out of resources"):
        best = T.tune_encode(fake_gpu["run"], 77, 32768, 768, 64, torch.bfloat16, CUDA)
    assert best == cands[2]
    fake_gpu["fail"] = set(cands)
    with pytest.raises(RuntimeError, match=r"all \d+ candidate configs failed .*M=1, n=4096.*out of resources"):
        T.tune_encode(fake_gpu["run"], 1, 4096, 768, 64, torch.bfloat16, CUDA)


def test_off_gpu_tuning_is_a_no_op(monkeypatch):
    called = []
    assert T.tune_encode(lambda cfg: called.append(cfg), 77, 1024, 64, 8, torch.float32, torch.device("cpu")) is None
    assert called == []
