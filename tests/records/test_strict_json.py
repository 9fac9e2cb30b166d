"""Strict result files (issue 17): atomic_write_json refuses NaN / inf with a ValueError naming the
key path (JSON has no such numbers) and leaves the old file; check_writable_dir finds an
unwritable result directory before any work, and leaves nothing behind."""
import json
import os

import pytest

from snce_fast.records.atomic import atomic_write_json, check_writable_dir


def _strict_load(path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"fvu": float("nan"), "steps": 3}, "fvu is NaN"),
        ({"history": [{"fvu": 1.0}, {"fvu": float("inf")}]}, "history[1].fvu is inf"),
        ({"a": {"b": (1.0, float("-inf"))}}, "a.b[1] is -inf"),
        ([0.5, float("nan")], "[1] is NaN"),
        (float("nan"), "the value is NaN"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, obj, message):
    target = tmp_path / "report.json"
    target.write_text('{"old": 1}\n')
    with pytest.raises(ValueError) as info:
        atomic_write_json(target, obj)
    assert message in str(info.value)
    assert target.read_text() == '{"old": 1}\n'  # the old file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_finite_values_are_written_as_standard_json(tmp_path):
    record = {"fvu": 0.25, "steps": 3, "history": [{"step": 1, "fvu": 1e-300}], "name": "nan", "none": None}
    atomic_write_json(tmp_path / "r.json", record)
    assert _strict_load(tmp_path / "r.json") == record


def test_check_writable_dir_creates_and_cleans_up(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert check_writable_dir(deep) == deep
    assert not (tmp_path / "a").exists()  # the directories it created are removed again
    (tmp_path / "kept").mkdir()
    check_writable_dir(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())  # probe removed


def test_check_writable_dir_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file" / "out", tmp_path / "file"):
        with pytest.raises(ValueError, match=rf"'{bad}' is not a writable directory"):
            check_writable_dir(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_writable_dir_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not restrict this user (root)")
        for bad in (ro, ro / "sub"):
            with pytest.raises(ValueError, match=rf"'{bad}' is not a writable directory \(Permission denied\)"):
                check_writable_dir(bad)
    finally:
        os.chmod(ro, 0o700)
