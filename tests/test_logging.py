"""Logging: the library reports through the `snce_fast` logger (snce_fast.log) and never prints;
only the CLI (snce_fast/cli/) and the demo (snce_fast/demo/) write to the terminal themselves."""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import snce_fast
from snce_fast import SAE
from snce_fast.log import get_logger
from snce_fast.testing import random_sae

PACKAGE = Path(__file__).resolve().parents[1] / "snce_fast"


def test_no_print_in_the_library():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("cli", "demo"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"snce_fast/{rel}:{node.lineno}")
    assert not found, "print() in the library (use logging.getLogger(__name__)): " + ", ".join(found)


@pytest.fixture
def restore_logger():
    logger = logging.getLogger("snce_fast")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_set_verbosity_shows_info(tmp_path, restore_logger, capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a script that configured nothing
    random_sae(8, 16, 2, hook="layer:1").save_saelens(tmp_path)
    SAE.from_saelens(tmp_path)
    assert "snce_fast" not in capsys.readouterr().err  # info is silent by default
    assert snce_fast.set_verbosity("info") == logging.INFO
    SAE.from_saelens(tmp_path)
    err = capsys.readouterr().err
    assert "snce_fast.sae.importers: INFO:" in err and "hook 'layer:1'" in err
    snce_fast.set_verbosity(logging.ERROR)
    SAE.from_saelens(tmp_path)
    assert capsys.readouterr().err == ""


def test_get_logger_names_children_only():
    assert get_logger("snce_fast.sae").parent is logging.getLogger("snce_fast")
    with pytest.raises(ValueError, match="'diffusers'"):
        get_logger("diffusers")
