import os

# Triton decides at decoration time whether a @triton.jit function is interpreted, and
# triton's own standard-library helpers are decorated when triton is first imported (which
# diffusers/transformers may do early). Without a GPU, turn the interpreter on before
# anything can import triton so every kernel in the session runs interpreted.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    else:
        # Every interpreted load/store is bounds-checked: the interpreter itself does not check,
        # so an out-of-range access would otherwise corrupt the test process's heap.
        from interpreter_bounds import enable as _enable_bounds_checks

        if not _enable_bounds_checks():
            import warnings

            warnings.warn("this triton's interpreter lacks the hooks tests/interpreter_bounds.py uses: "
                          "interpreted loads and stores are NOT bounds-checked in this run")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_on_cpu():
    """For tests that run the Triton kernels on CPU tensors: that needs the interpreter, which is
    switched on above at startup only when there is no CUDA (on a GPU machine these tests skip)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 from startup")


@pytest.fixture(autouse=True)
def one_pass_by_default(monkeypatch):
    """The tests train on corpora of a few thousand tokens, where `epochs=None` would repeat the corpus
    up to 100 times to reach the default token budget. They keep to one pass unless they set `epochs`;
    tests/train/test_plan.py tests the automatic choice itself (it restores the real cap)."""
    from snce_fast.train import plan

    monkeypatch.setattr(plan, "MAX_AUTO_EPOCHS", 1)
