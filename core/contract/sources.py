"""Where a method comes from, as data: its sources and each deviation from them.

An attack or defense declares, next to its class::

    sources = (Source(paper="Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, "
                            "NeurIPS 2021",
                      repo="csdongxian/ANP_backdoor", path="optimize_mask_cifar.py",
                      commit="<the 40-hex commit that was read>", backdoorbench="config/defense/anp/cifar10.yaml"),)
    deviations = (Deviation("clean data", ours="the grid's clean share", theirs="1 % of CIFAR-10",
                            why="one clean share for every defense of a grid"),)

`bench list NAME` shows them, every cell logs them (tag ``nadbench.sources``) and
``python -m nadbench.commands.fidelity`` writes the fidelity table (docs/fidelity.md) from the built-ins'.
Third-party plugins may leave both empty; the built-ins must declare them (tests/test_sources.py).
Importing this module does not import torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

# The BackdoorBench snapshot whose configs the built-ins' ``backdoorbench`` paths and ``bb`` values were read from.
BACKDOORBENCH_REPO = "SCLBD/BackdoorBench"
BACKDOORBENCH_COMMIT = "f02e3534645f0ee63d6848653062cd6c0d6c400d"

_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """A paper and the code its settings were read from.

    ``repo`` is the official repository as ``owner/name``, ``path`` the file its settings were read
    from, ``commit`` the 40-hex commit read. A method without official code leaves ``repo`` empty and
    says why in ``no_code`` (e.g. "no code released; settings from the NAD authors' code").
    ``backdoorbench``: BackdoorBench's config for the method ("" when it has none)."""

    paper: str
    repo: str = ""
    path: str = ""
    commit: str = ""
    backdoorbench: str = ""
    no_code: str = ""

    @property
    def where(self) -> str:
        """``owner/name@short-commit:path``, or the reason there is no code."""
        return f"{self.repo}@{self.commit[:12]}:{self.path}" if self.repo else f"no official code ({self.no_code})"


@dataclass(frozen=True)
class Deviation:
    """One setting where we depart from the source: ours, the authors' (``theirs``), BackdoorBench's
    (``bb``, "" when it has no such setting or it was not read) and why."""

    setting: str
    ours: str
    theirs: str
    why: str
    bb: str = ""


def _declared(item, attr: str, kind: type) -> tuple:
    """An item's ``attr`` declarations as a tuple (a single one, not in a tuple, is accepted)."""
    value = getattr(item, attr, ())
    return (value,) if isinstance(value, kind) else tuple(value or ())


def sources_of(item) -> tuple[Source, ...]:
    return _declared(item, "sources", Source)


def deviations_of(item) -> tuple[Deviation, ...]:
    return _declared(item, "deviations", Deviation)


def problems(item, required: bool = False) -> list[str]:
    """What is wrong with an item's declarations ([] when nothing). ``required``: an item without
    sources is a problem (the built-ins); a third party may declare none."""
    out = []
    srcs = sources_of(item)
    if required and not srcs:
        out.append("declares no sources")
    for s in srcs:
        if not isinstance(s, Source):
            out.append(f"source {s!r} is not a nadbench Source")
            continue
        if not s.paper.strip():
            out.append("a source names no paper")
        if s.repo:
            if not _REPO.match(s.repo):
                out.append(f"source repo {s.repo!r} is not 'owner/name'")
            if not _COMMIT.match(s.commit):
                out.append(f"source {s.repo}: commit {s.commit!r} is not 40 lowercase hex digits")
            if not s.path.strip():
                out.append(f"source {s.repo}: no path (the file its settings were read from)")
        elif not s.no_code.strip():
            out.append(f"source {s.paper!r} has no repo and says not why (no_code)")
        if s.backdoorbench and not s.backdoorbench.startswith(("config/", "resource/", "defense/", "attack/")):
            out.append(f"source {s.paper!r}: backdoorbench {s.backdoorbench!r} is not a path in BackdoorBench")
    for d in deviations_of(item):
        if not isinstance(d, Deviation):
            out.append(f"deviation {d!r} is not a nadbench Deviation")
        elif not (d.setting.strip() and d.ours.strip() and d.theirs.strip() and d.why.strip()):
            out.append(f"deviation {d.setting!r} leaves setting, ours, theirs or why empty")
    return out


def summary(item) -> dict:
    """A small, JSON-able summary of an item's declarations (what a cell logs)."""
    return {"sources": [s.where for s in sources_of(item)],
            "deviations": [d.setting for d in deviations_of(item)]}


def cell_tag(attack, defense) -> str:
    """The ``nadbench.sources`` tag of a cell: its attack's and defense's declarations, compact JSON."""
    return json.dumps({"attack": summary(attack), "defense": summary(defense)}, separators=(",", ":"))


def describe(item) -> list[str]:
    """Lines for `bench list NAME`."""
    lines = []
    for s in sources_of(item):
        lines.append(f"source: {s.paper}")
        lines.append(f"  code: {s.where}")
        if s.backdoorbench:
            lines.append(f"  BackdoorBench: {s.backdoorbench}")
    devs = deviations_of(item)
    if devs:
        lines.append("deviations (setting: ours | authors' | BackdoorBench's — why):")
    for d in devs:
        lines.append(f"  {d.setting}: {d.ours} | {d.theirs} | {d.bb or '-'} — {d.why}")
    return lines
