"""Check a built snce_fast wheel before it ships: every package of the source tree is inside,
the Triton kernels are `snce_fast/kernels` (never a top-level `kernels`), `py.typed` is there,
the C++ extension carries no debug information, and the torch requirement is the exact release
the extension was compiled against.

    python scripts/check_wheel.py dist/snce_fast-*.whl
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    pkgs = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "snce_fast").rglob("__init__.py")}
    return pkgs | {"snce_fast/kernels"}


def check(wheel: Path) -> list[str]:
    import torch

    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        for pkg in sorted(source_packages()):
            if f"{pkg}/__init__.py" not in names:
                problems.append(f"package {pkg.replace('/', '.')} is missing from the wheel")
        if any(n.startswith("kernels/") for n in names):
            problems.append("the wheel installs a top-level 'kernels' package (it must be snce_fast.kernels only)")
        if "snce_fast/py.typed" not in names:
            problems.append("snce_fast/py.typed is missing")
        exts = [n for n in names if re.match(r"snce_fast/_C\..*\.(so|pyd)$", n)]
        if not exts:
            problems.append("the C++ extension snce_fast/_C is missing")
        for ext in exts:
            data = z.read(ext)
            if b".debug_info" in data or b".debug_line" in data:
                problems.append(f"{ext} carries debug sections ({len(data) / 1e6:.1f} MB): expected a stripped build")
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist: torch")]
        want = f"torch=={torch.__version__.split('+')[0]}"
        if [r.split(";")[0].replace(" ", "").removeprefix("Requires-Dist:") for r in requires] != [want]:
            problems.append(f"torch requirement {requires}: expected exactly {want} (the torch _C was built against)")
    return problems


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/check_wheel.py WHEEL")
    found = check(Path(sys.argv[1]))
    for p in found:
        print(f"check_wheel: {p}", file=sys.stderr)
    if not found:
        print(f"check_wheel: {Path(sys.argv[1]).name} OK")
    sys.exit(1 if found else 0)
