"""Atomic writes: the result has a plain open()'s mode, a failed write keeps the old file, no temp left."""
import os
import stat

import pytest

from snce_fast.records.atomic import atomic_path, atomic_write_text
from snce_fast.testing import random_sae


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_mode_matches_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "y")
    assert _mode(tmp_path / "atomic.txt") == _mode(plain)
    random_sae(8, n=16, k=2).save(tmp_path / "sae")
    for name in ("config.json", "sae.safetensors"):
        assert _mode(tmp_path / "sae" / name) == _mode(plain)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
