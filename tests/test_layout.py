"""The package's layers (``nadbench/__init__.py`` draws them): every import in ``core/``, those inside
functions included, runs down the layers or within one; the engine and the toolkit never import
each other. And the flat layout's import paths still give the modules that moved."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).parents[1] / "core"
RANK = {"contract": 0, "training": 1, "toolkit": 2, "engine": 2, "commands": 3}
SIDE_BY_SIDE = {"toolkit", "engine"}


def _module(file: Path, root: Path = CORE) -> str:
    parts = ["nadbench", *file.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path, root: Path = CORE):
    """(line, absolute module) for every import in ``file`` that names a nadbench module."""
    module = _module(file, root)
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("nadbench"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "nadbench":  # `from .. import settings`: the names are modules
                yield from ((node.lineno, f"nadbench.{a.name}") for a in node.names)
            elif base.startswith("nadbench"):
                yield node.lineno, base


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def wrong_way(files, root: Path = CORE) -> list[str]:
    found = []
    for file in files:
        here = _layer(_module(file, root))
        for line, target in _imports(file, root):
            there = _layer(target)
            if here is None or there is None or there == here:
                continue
            if RANK[there] > RANK[here] or {here, there} == SIDE_BY_SIDE:
                found.append(f"{file.relative_to(root)}:{line} ({here}) imports {target} ({there})")
    return found


def test_core_is_in_its_layers_and_every_import_runs_down():
    files = sorted(CORE.rglob("*.py"))
    top = {f.name for f in files if f.parent == CORE}
    assert top == {"__init__.py", "moved.py"}, f"core/ holds only its layers' packages: {sorted(top)}"
    assert {f.parent.relative_to(CORE).parts[0] for f in files if f.parent != CORE} == set(RANK)
    assert wrong_way(files) == []


def test_the_walk_finds_an_import_that_runs_up(tmp_path):
    """The check itself, on a scratch tree laid out as core/ (never core/ itself, which other test
    files read): an engine module importing the commands lazily inside a function, and the toolkit
    importing the engine, are each found."""
    engine, toolkit = tmp_path / "engine" / "x.py", tmp_path / "toolkit" / "y.py"
    for file, text in {engine: "def f():\n    from ..commands import tables\n",
                       toolkit: "from nadbench.engine.grid import Cell\n"}.items():
        file.parent.mkdir()
        file.write_text(text)
    assert len(wrong_way([engine, toolkit], root=tmp_path)) == 2


@pytest.mark.parametrize("old, new", [("nadbench.train", "nadbench.training.train"),
                                      ("nadbench.channels", "nadbench.toolkit.channels"),
                                      ("nadbench.generators", "nadbench.toolkit.iad_networks"),
                                      ("nadbench.stages.train", "nadbench.engine.stages.train"),
                                      ("nadbench.table", "nadbench.commands.tables")])
def test_a_flat_path_gives_the_module_itself(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_a_stage_key_reads_a_plugins_flat_imports_as_the_moved_modules():
    """A plugin importing ``nadbench.train`` has the training loop's code in its keys, as one
    importing ``nadbench.training.train`` does."""
    from nadbench.engine.codehash import closure

    names = {name for name, _ in closure("nadbench.train")[0]}
    assert {"nadbench.training.train", "nadbench.training.augment", "nadbench.contract.api"} <= names
    assert "nadbench.train" not in names


def test_python_m_runs_a_moved_module_by_its_flat_path():
    out = subprocess.run([sys.executable, "-m", "nadbench.fidelity", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fidelity" in out.stdout, out.stderr


def test_no_function_in_core_is_longer_than_60_lines():
    """From ``def`` to its end, decorators excluded: a reader follows one function on one screen."""
    long = [f"{file.relative_to(CORE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for file in sorted(CORE.rglob("*.py")) for node in ast.walk(ast.parse(file.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
