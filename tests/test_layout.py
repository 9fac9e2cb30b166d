"""The package's layout rules (docs/architecture.md): imports flow downward between rooms, the library
never imports its CLI, every module imports on its own, and modules and functions stay small."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "snce_fast"

# the rooms, lowest first: a module may import its own room and any room of a lower rank
RANK = {
    "checks": 0, "records": 0, "distributed": 0, "log": 0,
    "plots": 1, "ops": 1,
    "sae": 2,
    "hooks": 3, "models": 3,
    "workflow": 4, "train": 4,
    "demo": 5, "evaluation": 5, "benchmarking": 5, "corpus_benchmarks": 5, "info": 5,
    "attack": 6,
    "cli": 7,
    "__init__": 8, "__main__": 8, "testing": 8,
}
# the Triton kernels (kernels/, installed as snce_fast.kernels) and the C++ extension are the fast
# implementations of the ops room
ALIAS = {"kernels": "ops", "_C": "ops"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out.append(("snce_fast." + ".".join(rel.parts), path))
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out.append(("snce_fast.kernels." + path.stem, path))
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    return ALIAS.get(room, room)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported snce_fast module) for every import statement, at any depth."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("snce_fast")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if not name.startswith("snce_fast"):
                continue
            if name == "snce_fast":  # `from snce_fast import ops` names the room in the alias
                found += [(node.lineno, f"snce_fast.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, name))
    return found


def test_imports_flow_downward_and_the_library_never_imports_its_cli():
    bad = []
    for module, path in _modules():
        room = _room(module)
        if module == "snce_fast.__init__" or room == "__init__":
            continue
        for line, target in _imports(path, module):
            other = _room(target)
            if other not in RANK:  # e.g. `from snce_fast import __version__`
                continue
            if other != room and RANK[other] >= RANK[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {target} ({other})")
    assert not bad, "imports that do not flow downward (docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("module", [m for m, _ in _modules() if not m.endswith(("__main__", ".compile_check"))
                                    and not m.startswith("snce_fast.kernels.")])
def test_every_module_imports_on_its_own(module):
    importlib.import_module(module.removesuffix(".__init__"))


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for module, path in _modules():
        if not path.is_relative_to(PACKAGE):
            continue
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def test_every_package_directory_ships():
    """setup.py ships the packages find_packages sees: a folder of modules without __init__.py would be dropped."""
    for directory in [p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        if any(directory.glob("*.py")):
            assert (directory / "__init__.py").is_file(), f"{directory.relative_to(ROOT)} has no __init__.py"
