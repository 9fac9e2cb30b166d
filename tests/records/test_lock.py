"""snce_fast.records.lock.output_lock: one writer per output path, the second fails at once naming the
holder's pid; nothing is left behind."""
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from snce_fast.records.lock import OutputLockedError, lock_path, output_lock

pytest.importorskip("fcntl")

HOLD = textwrap.dedent("""
    import sys, time
    from snce_fast.records.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says so
""")

TRY = textwrap.dedent("""
    import sys
    from snce_fast.records.lock import OutputLockedError, output_lock
    try:
        with output_lock(sys.argv[1]):
            print("got it")
    except OutputLockedError as e:
        print(e)
        sys.exit(3)
""")


def _python(code, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def test_a_second_process_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "stats"
    holder = _python(HOLD, out, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        second = _python(TRY, out)
        stdout, stderr = second.communicate(timeout=60)
        assert second.returncode == 3, stderr
        assert stdout.strip() == f"another snce-fast run is writing {out} (pid {holder.pid})"
        assert time.perf_counter() - t0 < 30  # never waits for the holder
        # this process too: a held lock refuses any other opener
        with pytest.raises(OutputLockedError, match=rf"pid {holder.pid}\)"), output_lock(out):
            pass
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    # released: the next run gets it, and the lock file is gone afterwards
    after = _python(TRY, out)
    assert after.communicate(timeout=60)[0].strip() == "got it" and after.returncode == 0
    assert not lock_path(out).exists()
    assert not out.exists(), "the lock never creates the output itself"


def test_same_lock_for_a_path_however_spelled_and_for_files_and_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    assert lock_path("d") == lock_path(tmp_path / "d") == lock_path(str(tmp_path / "d") + "/") \
        == lock_path(tmp_path / "x" / ".." / "d") == tmp_path / ".d.snce_fast.lock"
    assert lock_path(tmp_path / "flags.csv") == tmp_path / ".flags.csv.snce_fast.lock"
    with output_lock("d"):
        with pytest.raises(OutputLockedError, match=re.escape(f"another snce-fast run is writing {tmp_path / 'd'} (")):
            with output_lock(tmp_path / "d"):
                pass
        with output_lock(tmp_path / "flags.csv"):  # another output: its own lock
            pass


def test_released_on_error_and_created_parents_removed(tmp_path):
    out = tmp_path / "a" / "b" / "flags.csv"
    with pytest.raises(RuntimeError), output_lock(out) as lock:
        assert lock.is_file() and lock.read_text().strip() == str(os.getpid())
        raise RuntimeError("the run failed")
    assert not (tmp_path / "a").exists(), "directories the lock created go again when empty"
    with output_lock(out):
        out.write_text("x")
    assert out.read_text() == "x" and sorted(p.name for p in out.parent.iterdir()) == ["flags.csv"]


def test_unwritable_places_name_the_output(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"cannot write '{a_file / 'out'}': '{a_file}' is a file")):
        with output_lock(a_file / "out"):
            pass
    with pytest.raises(NotADirectoryError, match="is a file"), output_lock(a_file / "deeper" / "out.json"):
        pass
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match=re.escape(f"cannot write '{ro / 'out'}'")):
                with output_lock(ro / "out"):
                    pass
        finally:
            ro.chmod(0o700)
