"""The source tree's kernels/ directory imported a second time as a top-level `kernels`.

transformers probes for HF's `kernels` package on import (importlib.import_module("kernels")), and
with the repository root on sys.path (`python -m pytest`, a REPL there) that finds our directory.
Re-registering the snce_fast:: ops from that second module made torch destroy the first
registrations while snce_fast.kernels kept calling them: a use-after-free that surfaced as a random
segfault or "vector::reserve" error many tests later.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_a_top_level_kernels_import_registers_nothing_and_breaks_nothing():
    code = textwrap.dedent(f"""
        import importlib, json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        import torch._library.custom_ops as co
        import snce_fast.kernels as sk
        from snce_fast.sae.model import SAE

        ops = [q for q in co.OPDEF_TO_LIB if q.startswith("snce_fast::")]
        before = {{q: id(co.OPDEF_TO_LIB[q]) for q in ops}}
        top = importlib.import_module("kernels")  # what transformers' is_kernels_available() does
        try:
            importlib.import_module("kernels.encode_topk")
            sub_error = ""
        except ImportError as e:
            sub_error = str(e)
        from transformers.utils import import_utils
        hf = getattr(import_utils, "is_kernels_available", lambda: False)()
        after = {{q: id(co.OPDEF_TO_LIB[q]) for q in ops}}
        torch.manual_seed(0)
        sae = SAE(16, 64, k=3)
        v, i = sk.encode(torch.randn(5, 16), sae)
        import transformers.activations  # imports HF's `kernels` when transformers finds it installed
        print(json.dumps(dict(ops=sorted(ops), same=before == after, top_error=str(getattr(top, "_IMPORT_ERROR", "")),
                              ours="_IMPORT_ERROR" in vars(top),
                              sub_error=sub_error, hf=hf, shape=list(v.shape))))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ops"] == ["snce_fast::encode_topk", "snce_fast::threshold_survivors", "snce_fast::triton_edit_residual",
                          "snce_fast::triton_edit_residual_keys", "snce_fast::triton_edit_residual_threshold",
                          "snce_fast::triton_sparse_decode"]
    assert res["same"], "importing the top-level `kernels` replaced the registered ops"
    assert res["shape"] == [5, 3]
    if res["ours"]:  # no HF `kernels` installed: this tree's directory, inert
        assert "import snce_fast.kernels" in res["top_error"]
        assert "import snce_fast.kernels instead" in res["sub_error"]
        assert res["hf"] is False  # transformers does not mistake it for HF's kernels package
    else:  # HF's `kernels` installed (transformers >= 5.25 requires it): the importer gets that package
        assert res["hf"] is True and res["top_error"] == ""
