"""The defend stage: a defense repairs the backdoored model on the defender's clean data, held to
the plugin contract, and the engine's one evaluation measures what it returned. Stage keys hash
this module with ``nadbench.training.evaluate`` and ``nadbench.training.subsets`` (see ``nadbench.engine.codehash``).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..contract.api import Defended, DefenseContext, Split
from ..contract.config import PluginError
from ..training.evaluate import defense_effectiveness

# Metric prefixes the engine logs itself; a defense's named side models take others.
RESERVED_PREFIXES = ("before", "after", "clean", "time", "defense")


def apply_defense(defense, model: torch.nn.Module, clean: Split, ctx: DefenseContext) -> tuple[Defended, float]:
    """The one way a defense runs, in a grid cell and in `bench defend`: seeded, timed, and held to
    the contract (it returns the repaired module, or a ``Defended``; a data-free one gets an empty
    ``clean``). Returns (Defended, seconds)."""
    start = time.perf_counter()
    if not getattr(defense, "uses_clean_data", True):  # data-free: it gets no image at all
        clean = clean.subset(torch.zeros(0, dtype=torch.long, device=clean.labels.device))
    torch.manual_seed(ctx.seed)
    out = defense.defend(model, clean, ctx)
    defended = out if isinstance(out, Defended) else Defended(out)
    modules = [defended.model, *defended.extras.values(), *defended.models.values()]
    if not all(isinstance(m, torch.nn.Module) for m in modules):
        raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: "
                          f"defend() must return the repaired nn.Module (or a Defended holding modules), "
                          f"it returned {out!r}")
    taken = {*RESERVED_PREFIXES, defended.axis} if defended.extras else set(RESERVED_PREFIXES)
    bad = [n for n in defended.models if not n.isidentifier() or n in taken]
    if bad:
        raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: side "
                          f"model name(s) {', '.join(map(repr, bad))} must be identifiers other than "
                          f"{', '.join(sorted(taken))} (the engine's own metric prefixes)")
    return defended, time.perf_counter() - start


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
