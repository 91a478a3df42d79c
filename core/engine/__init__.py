"""The engine: plugin discovery (``registry``), the grid (``grid``), stage keys and the content-keyed
store (``plan``, ``codehash``, ``store``), the stages themselves (``stages``), the cell driver
(``runner``), executors, and recording (``record``, ``tracking``, ``figures``).

``nadbench.engine.Runner`` and the other names of :mod:`nadbench.engine.runner` resolve here on
first use, so that code written for the flat layout's ``nadbench.engine`` keeps working. The import
is by name, not an ``import`` statement: every stage key's code closure passes through this file,
and the driver is kept out of the keys.
"""
import importlib
from pathlib import Path


def __getattr__(name: str):
    here = Path(__file__).parent
    if name.startswith("__") or (here / f"{name}.py").is_file() or (here / name).is_dir():
        raise AttributeError(name)  # a submodule not imported yet: the import system loads it
    runner = importlib.import_module(f"{__name__}.runner")
    try:
        return getattr(runner, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
