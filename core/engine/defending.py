"""The defend stage: a defense repairs the backdoored model on the defender's clean data (or, a
training-time one, trains a model on the poisoned set), held to the plugin contract, and the engine's
one evaluation measures what it returned. Stage keys hash this module with
``nadbench.training.evaluate`` and ``nadbench.training.subsets`` (see ``nadbench.engine.codehash``).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..contract.api import Defended, DefenseContext, Split, TrainingContext
from ..contract.config import PluginError
from ..training.evaluate import defense_effectiveness

# Metric prefixes the engine logs itself; a defense's named side models take others.
RESERVED_PREFIXES = ("before", "after", "clean", "time", "defense")


def apply_defense(defense, model: torch.nn.Module, clean: Split, ctx: DefenseContext) -> tuple[Defended, float]:
    """The one way a defense runs, in a grid cell and in `bench defend`: seeded, timed, and held to
    the contract (it returns the repaired module, or a ``Defended``; a data-free one gets an empty
    ``clean``). Returns (Defended, seconds)."""
    start = time.perf_counter()
    clean = _given(defense, clean)
    torch.manual_seed(ctx.seed)
    defended = held(defense, defense.defend(model, clean, ctx), "defend", "repaired")
    return defended, time.perf_counter() - start


def apply_training_defense(defense, data: Split, clean: Split, ctx: TrainingContext) -> tuple[Defended, float]:
    """The one way a training-time defense runs, in a grid cell and in `bench train`: seeded (its
    model starts as plain training's does, from ``ctx.build_model()``), timed and held to the
    contract as :func:`apply_defense` holds a repair. Returns (Defended, seconds)."""
    start = time.perf_counter()
    clean = _given(defense, clean)
    torch.manual_seed(ctx.seed)
    defended = held(defense, defense.train(data, clean, ctx), "train", "trained")
    return defended, time.perf_counter() - start


def _given(defense, clean: Split) -> Split:
    """The clean data a defense gets: none at all (an empty split) unless it declares ``uses_clean_data``."""
    if getattr(defense, "uses_clean_data", True):
        return clean
    return clean.subset(torch.zeros(0, dtype=torch.long, device=clean.labels.device))


def held(defense, out, method: str, what: str) -> Defended:
    """A defense's return value as a ``Defended``, or a one-line PluginError naming the plugin and the rule."""
    defended = out if isinstance(out, Defended) else Defended(out)
    modules = [defended.model, *defended.extras.values(), *defended.models.values()]
    if not all(isinstance(m, torch.nn.Module) for m in modules):
        raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: "
                          f"{method}() must return the {what} nn.Module (or a Defended holding modules), "
                          f"it returned {out!r}")
    taken = {*RESERVED_PREFIXES, defended.axis} if defended.extras else set(RESERVED_PREFIXES)
    bad = [n for n in defended.models if not n.isidentifier() or n in taken]
    if bad:
        raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: side "
                          f"model name(s) {', '.join(map(repr, bad))} must be identifiers other than "
                          f"{', '.join(sorted(taken))} (the engine's own metric prefixes)")
    return defended


def measure_defended(repaired: Defended, measure: Callable[[torch.nn.Module], dict],
                     before: dict | None = None) -> dict:
    """``after`` (the repaired model), and, when the defense returned them, ``extras`` (models along
    its axis, e.g. MCR's points along t) and ``models`` (named side models, e.g. NAD's teacher),
    each measured by ``measure`` where the test data is: the defense never sees it. With ``before``
    (the backdoored model's ``acc`` and ``asr``), the repaired model and the extras get ``der``."""
    def rated(m):
        out = measure(m)
        if before is not None and "asr" in before and "asr" in out:
            out["der"] = defense_effectiveness(before, out)
        return out

    out = {"after": rated(repaired.model)}
    if repaired.extras:
        out["extras"] = {"axis": repaired.axis, "points": [{repaired.axis: x, **rated(m)}
                                                           for x, m in sorted(repaired.extras.items())]}
    if repaired.models:
        out["models"] = {n: measure(m) for n, m in repaired.models.items()}
    return out
