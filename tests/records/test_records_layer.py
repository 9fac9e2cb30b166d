"""snce_fast.records is the bottom layer: its modules import no other part of snce_fast (the SAE, the
ops, the hooks, the workflow), only each other."""
import ast
from pathlib import Path

import snce_fast.records

RECORDS = Path(snce_fast.records.__file__).parent


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_records_import_only_records():
    files = sorted(RECORDS.glob("*.py"))
    assert {"scores.py", "calibration.py", "atomic.py"} <= {f.name for f in files}
    for f in files:
        inside = [m for m in _imports(f) if m.split(".")[0] == "snce_fast"]
        assert all(m.startswith("snce_fast.records") for m in inside), (f.name, inside)
