"""The import paths of nadbench's earlier flat layout (``nadbench.train``, ``nadbench.channels``,
...), kept working: each names the module it moved to, and importing it gives that very module (so
a plugin's ``from nadbench.train import Step`` and ``monkeypatch.setattr(nadbench.train, ...)`` act
on the one module). New code imports the new paths; the README gives them.

Stage keys follow a plugin's imports (:mod:`nadbench.engine.codehash`), so it maps an old path to
its module with :func:`canonical` before reading the file.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {f"nadbench.{old}": f"nadbench.{new}" for old, new in {
    # the plugin contract
    "api": "contract.api", "config": "contract.config", "hookspecs": "contract.hookspecs",
    "sources": "contract.sources",
    # the training core
    "data": "training.data", "subsets": "training.subsets", "augment": "training.augment",
    "train": "training.train", "steps": "training.steps", "fused": "training.fused",
    "evaluate": "training.evaluate", "models": "training.models", "attention": "training.attention",
    "settings": "training.settings",
    # the methods' toolkit
    "adversarial": "toolkit.adversarial", "channels": "toolkit.channels", "frequency": "toolkit.frequency",
    "warping": "toolkit.warping", "implicit": "toolkit.implicit", "generators": "toolkit.iad_networks",
    "stegastamp": "toolkit.stegastamp",
    # the engine (``nadbench.engine`` itself is now the package, which lends the runner's names)
    "registry": "engine.registry", "grid": "engine.grid", "plan": "engine.plan", "codehash": "engine.codehash",
    "store": "engine.store", "poisoning": "engine.poisoning", "defending": "engine.defending",
    "reactivation": "engine.reactivation", "executors": "engine.executors", "record": "engine.record",
    "tracking": "engine.tracking", "environment": "engine.environment", "report": "engine.figures",
    "stages": "engine.stages", "stages.train": "engine.stages.train", "stages.poison": "engine.stages.poison",
    "stages.defend": "engine.stages.defend", "stages.fused": "engine.stages.fused",
    # the commands
    "cli": "commands.cli", "table": "commands.tables", "repair": "commands.practitioner",
    "handover": "commands.userfiles", "fidelity": "commands.fidelity",
}.items()}


def canonical(name: str) -> str:
    """The module an import path names now (``nadbench.train`` -> ``nadbench.training.train``)."""
    return MOVED.get(name, name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads the module it moved to in its place: the import system keeps
    what ``exec_module`` leaves in ``sys.modules`` under the old name, the moved module itself."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])

    def get_code(self, name):
        """``python -m nadbench.fidelity``: run the moved module as ``__main__`` under its own name
        (its relative imports need its own package)."""
        return compile(f"import runpy; runpy.run_module({MOVED[name]!r}, run_name='__main__', alter_sys=True)",
                       f"<{name}: moved to {MOVED[name]}>", "exec")


def install() -> None:
    """First on the meta path: an old submodule path (``nadbench.stages.train``) must not be found
    by the path finder under its old parent's folder, which would load the file a second time."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
