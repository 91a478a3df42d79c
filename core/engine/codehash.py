"""Hashes of the code a stage runs, for stage keys.

A stage's key covers the source of every module that computes its output: the modules it names
(e.g. the attack plugin's module and ``nadbench.engine.poisoning``) and everything they import, found by
reading their ``import`` statements (those inside functions too) and followed within the packages
that matter: the plugin's own top-level package and ``nadbench``. Other libraries are covered by
version, and only those whose version can change numbers (``NUMERIC_LIBRARIES``: torch,
torchvision, timm); a tqdm or mlflow upgrade changes no key. Code that cannot change an output
(the CLI, tracking, tables, the engine's bookkeeping) is kept out of the modules stages import.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

from ..moved import canonical

NUMERIC_LIBRARIES = ("torch", "torchvision", "timm")
CORE_PACKAGE = "nadbench"


def _source_file(module: str) -> Path | None:
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    if file is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec else None
    return Path(file) if file and file.endswith(".py") and Path(file).is_file() else None


def _imports(module: str, file: Path) -> frozenset[str]:
    st = file.stat()
    return _parsed_imports(module, str(file), st.st_mtime_ns, st.st_size)


# Import statements, at any indentation (lazy imports inside functions count): parsing only these
# lines, not whole files, keeps a registry load fast. A docstring line that looks like an import
# only adds a module to a closure (over-inclusion never misses an edit).
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+[\w.]+[ \t]+import[ \t]+(?:\([^)]*\)|[^\n]*)|import[ \t]+[^\n]*)", re.M)


@lru_cache(maxsize=None)
def _parsed_imports(module: str, file: str, mtime_ns: int, size: int) -> frozenset[str]:
    """Absolute names of the modules ``file`` imports (``from x import y`` gives x and x.y, since y
    may be a submodule; names that are not modules are dropped later). Parsed once per version of
    the file: every plugin's closure walks the same core modules."""
    package = module if file.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for match in _IMPORT.finditer(Path(file).read_text(encoding="utf-8", errors="replace")):
        try:
            tree = ast.parse(match.group(0).strip())
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name)


def read_source(file: Path) -> bytes:
    """The bytes hashed for a module (a seam for tests that stand for an edited file)."""
    return file.read_bytes()


@lru_cache(maxsize=None)
def _versions() -> dict[str, str]:
    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def closure(*modules: str) -> tuple[list[tuple[str, Path]], set[str]]:
    """(modules with their files, numeric libraries imported) reachable from ``modules``, within
    their own top-level packages and nadbench."""
    roots = {m.split(".")[0] for m in modules} | {CORE_PACKAGE}
    seen: dict[str, Path] = {}
    libraries: set[str] = set()
    todo = list(modules)
    while todo:
        name = canonical(todo.pop())  # a flat-layout path (nadbench.train) is the module it moved to
        top = name.split(".")[0]
        if name in seen:
            continue
        if top not in roots:
            if top in NUMERIC_LIBRARIES:
                libraries.add(top)
            continue
        file = _source_file(name)
        if file is None:
            continue  # an attribute imported with `from x import y`, or a module without source
        seen[name] = file
        todo.extend(_imports(name, file))
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a.b runs a/__init__.py first
    return sorted(seen.items()), libraries


@lru_cache(maxsize=None)
def code_hash(*modules: str) -> str:
    """sha256 over the sources of ``modules`` and their imports (see :func:`closure`) and the
    versions of the numeric libraries among them."""
    files, libraries = closure(*modules)
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name}\n".encode())
        digest.update(read_source(file))
    versions = _versions()
    for lib in sorted(libraries):
        digest.update(f"{lib}=={versions.get(lib, '?')}\n".encode())
    return digest.hexdigest()
