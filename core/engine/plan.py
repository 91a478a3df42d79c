"""A cell's plan: its configured plugins and every stage key it uses, computed once.

The stages (core/engine.py) take a :class:`Plan`; they never recompute a key. A key holds every
input that changes the stage's output and nothing else (see core/store.py): the data by content,
the plugins' configs and code, the core modules that compute the stage, the device's numerics.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from ..contract import config as cfgmod
from ..contract.api import TARGET_MODES
from .codehash import code_hash
from .grid import Cell, Profile, by_profile, profile_values
from .registry import Registry, addressing, spelling, variant_order
from .store import stage_key

# The stage modules (core/stages/) whose code each key holds: their sources and their imports within
# nadbench (core/codehash.py), the stage's wiring included. The driver (core/engine.py) is in none.
POISON_CODE = ("nadbench.engine.stages.poison",)
NO_DEFENSE = "-"  # the defense of a cell that only backdoors a model (`bench attack`)
TRAIN_CODE = ("nadbench.engine.stages.train",)
FUSED_CODE = ("nadbench.engine.stages.fused",)  # in the train keys of a --fused run (not in the others: their keys stay)
CELL_CODE = ("nadbench.engine.stages.defend",)
DETECT_CODE = ("nadbench.engine.stages.detect",)
TRAIN_DEFENSE_CODE = ("nadbench.engine.stages.train_defense",)
# Stage folders under the cache (``$NADBENCH_CACHE``, default ~/.cache/nadbench).
MODELS_DIR = "models"   # trained models (clean, backdoored, supplied teachers, training-time defenses')
POISON_DIR = "poison"   # poisonings: changed training rows, the ASR set, what the attack logged
KIND_PREFIX = {"attacks": "attack", "defenses": "defense", "detectors": "detector"}

Key = tuple[str, str]  # (digest, the canonical text it digests)


def overrides_for(overrides: dict[str, dict], registry: Registry, kind: str, name: str) -> dict:
    """The ``--set`` overrides of one attack or defense (by its plain ``name``): those addressed to
    its kind (``attack.NAME`` / ``defense.NAME`` keys) over those addressed by the plain name, which
    are refused when an attack and a defense share that name."""
    plain = overrides.get(name) or {}
    others = [k for k in KIND_PREFIX if k != kind and (name in registry.items[k] or name in registry.ambiguous[k])]
    if plain and others:
        spelled = " or ".join(f"{KIND_PREFIX[k]}.{name}.FIELD" for k in (kind, *others))
        raise cfgmod.ConfigError(f"--set {name}.FIELD is ambiguous: {name!r} names more than one kind of plugin; "
                                 f"write {spelled}")
    return {**plain, **(overrides.get(f"{KIND_PREFIX[kind]}.{name}") or {})}


def config_values(registry: Registry, kind: str, name: str, overrides: dict[str, dict] | None = None,
                  prof: Profile | None = None) -> tuple[type, dict]:
    """The class of ``name`` and the values its config is built from (see :func:`configured`)."""
    cls, overrides = registry.get(kind, name), overrides or {}
    variants = sorted(set(name.split("@")[1:]), key=variant_order)
    declared = getattr(cls, "variant_defaults", {})
    variant_values = {k: v for var in variants for k, v in by_profile(declared.get(var) or {}, prof).items()}
    values = {**variant_values, **profile_values(cls, prof), **overrides_for(overrides, registry, kind, cls.name)}
    mode = next((v for v in variants if v in TARGET_MODES), None)
    if mode:  # NAME@all2all: the variant's mode
        values["target_mode"] = mode
    for spelled in addressing(cls.name, variants):  # then the --set addressed to the cell's spellings
        values.update(overrides.get(f"{KIND_PREFIX[kind]}.{spelled}", {}))
    return cls, values


def configured(registry: Registry, kind: str, name: str, overrides: dict[str, dict] | None = None,
               prof: Profile | None = None):
    """An attack or defense with its config: its defaults, then what the profile sets for it, then
    the user's ``--set`` overrides. A variant, ``NAME@bb``, ``NAME@all2all`` or both (any order),
    starts from the ``variant_defaults`` of each (a ``{profile: value}`` entry taken for ``prof``; on a
    field both set, the target variant's wins), ``@all2all`` sets ``target_mode``,
    and a ``--set`` addressed to a spelling the cell's includes (``NAME@bb``, then ``NAME@bb@all2all``)
    wins over those to ``NAME``. Raises ``ConfigError`` for an invalid value."""
    cls, values = config_values(registry, kind, name, overrides, prof)
    obj = cls.from_overrides(values)
    variants = name.split("@")[1:]
    mode = next((v for v in variants if v in TARGET_MODES), None)
    got = getattr(obj.config, "target_mode", None)
    if got is not None and got != (mode or "all2one"):  # the spelling names the row: it must not lie
        spelled = spelling(cls.name, [*(v for v in variants if v not in TARGET_MODES), got])
        raise cfgmod.ConfigError(f"{name}.target_mode = {got!r}: spell the attack {spelled} instead "
                                 f"(each target variant is its own grid cell and table row)")
    return obj


@dataclass(frozen=True)
class Plan:
    """One cell's configured attack and defense and its stage keys."""

    cell: Cell
    attack: Any                 # the configured attack (prepared by the poison stage that crafts)
    defense: Any                # the configured defense (None: a cell without one, NO_DEFENSE)
    poison: Key                 # the poison stage
    student: Key                # the train stage of the backdoored student
    teacher: Key | None         # the supplied teacher's train stage, when it is another model
    clean: Key                  # the clean model of the student architecture (when one is used)
    uses_clean: bool            # whether the cell uses that clean model (attack or clean reference)
    key: Key | None             # the cell's recorded result (None without a defense or detector)
    clean_share: float
    detector: Any = None        # the configured detector of a detection cell (its defense is None)
    defended: Key | None = None  # the model a training-time defense trains (its stored train stage)
    detectors: dict = dataclasses.field(default_factory=dict)  # the configured detectors that defense runs

    @property
    def uses_model(self) -> bool:
        """Whether the cell needs its backdoored student: a defense's, an input detector's, and a data
        detector's that reads the model trained on the set it inspects."""
        d = self.detector
        return d is None or d.level == "input" or d.uses_model

    def nodes(self) -> list[Node]:
        """The cell's stage calls, each after the nodes it reads: the clean model (an attack crafts
        against it, or the cell measures against it), the poisoning, the supplier's backdoored models
        (the student, a teacher of another architecture), a training-time defense's model, and last
        the cell itself (defend or detect, evaluate, record), which reads them all."""
        c, out = self.cell, []
        if self.uses_clean:
            out.append(Node("clean", self.clean, c, c.student))
        out.append(Node("poison", self.poison, c, c.student, (self.clean,) if self.attack.uses_clean_model else ()))
        if self.uses_model:
            out.append(Node("backdoored", self.student, c, c.student, (self.poison,)))
        if self.teacher:
            out.append(Node("teacher", self.teacher, c, c.teacher, (self.poison,)))
        if self.defended:
            out.append(Node("defended", self.defended, c, c.student, (self.poison, self.student)))
        if self.key:
            out.append(Node("cell", self.key, c, c.student, tuple(n.key for n in out)))
        return out

    def stored(self) -> list[tuple[str, Key]]:
        """(cache folder, key) of each stored stage the cell uses."""
        return [(n.folder, n.key) for n in self.nodes() if n.folder]


@dataclass(frozen=True)
class Node:
    """One stage call of a grid's graph: the stage, its key, a cell whose plan holds its inputs, the
    architecture it trains or measures, and the keys of the nodes whose outputs it reads."""

    stage: str                  # clean | poison | backdoored | teacher | defended | cell
    key: Key
    cell: Cell
    arch: str
    needs: tuple[Key, ...] = ()

    @property
    def folder(self) -> str | None:
        """The cache folder of a stored stage (None: the cell, whose result is recorded, not stored)."""
        return None if self.stage == "cell" else POISON_DIR if self.stage == "poison" else MODELS_DIR


def graph(plans) -> list[Node]:
    """The stage graph of a grid's cells: every plan's nodes, each stored stage once however many cells
    read it (the first cell that needs it gives its inputs), every node after the nodes it needs. The
    executors and the fused trainer schedule this list (core/engine/executors.py)."""
    seen: set[Key] = set()
    out = []
    for plan in plans:
        for node in plan.nodes():
            if node.stage == "cell" or node.key not in seen:
                seen.add(node.key)
                out.append(node)
    return out


class Keys:
    """Computes stage keys and plans. ``digests(dataset)`` gives the (limited) splits' content
    digests, ``{"train": ..., "test": ...}``; the planner never loads data itself."""

    def __init__(self, registry: Registry, prof: Profile, device_type: str, numerics: str,
                 overrides: dict[str, dict], clean_reference: bool, digests: Callable[[str], dict],
                 reactivation: bool = False, fpr: float = 0.05):
        self.fpr = fpr  # the false-positive rate of the engine's decision for detectors (detection cells)
        self.registry, self.profile, self.device_type, self.numerics = registry, prof, device_type, numerics
        self.overrides, self.clean_reference, self.digests = overrides, clean_reference, digests
        self.reactivation = reactivation
        self._plans: dict[Cell, Plan] = {}

    def _data(self, name: str, *splits: str) -> dict[str, Any]:
        """The data a stage reads, by content: digests of the (limited) splits it uses."""
        digests = self.digests(name)
        return {"name": name, **{split: digests[split] for split in splits}}

    def configured(self, kind: str, name: str):
        return configured(self.registry, kind, name, self.overrides, self.profile)

    def model(self, dataset: str, arch: str, seed: int, poison: str | None) -> Key:
        """The key of a model of ``arch`` trained with the profile's schedule on the clean training set
        (``poison`` None) or on the poisoning with that key."""
        return stage_key("train", {
            **self._training(dataset, arch, seed), "poison": poison,
            "code": code_hash(*TRAIN_CODE, *(FUSED_CODE if "fused" in self.numerics else ()))})

    def _training(self, dataset: str, arch: str, seed: int) -> dict[str, Any]:
        """What every trained model's key holds: the training set, the architecture, the profile's fields
        that change the weights, the device's numerics and the seed."""
        spec = self.registry.model(arch)
        prof = dataclasses.asdict(self.profile)
        for k in ("name", "clean_share", "finetune_lr", "test_limit", "detect_inputs"):  # no effect on the weights
            prof.pop(k)
        return {"data": self._data(dataset, "train"), "model": arch, "model_plugin": [spec.provider, spec.source_hash],
                "device": self.device_type, "precision": self.numerics, "seed": seed, "profile": prof}

    def defended(self, cell: Cell, defense, poison: Key, plain: Key, share: float) -> tuple[Key, dict]:
        """The key of the model a training-time defense trains on the poisoning ``poison`` (the plainly
        trained model's key ``plain`` beside it: the defense may start from it), and the configured
        detectors it runs, whose configs and code the key holds."""
        detectors = {name: self.configured("detectors", name) for name in defense.uses_detectors}
        return stage_key("train-defense", {
            **self._training(cell.dataset, cell.student, cell.seed), "poison": poison[0], "plain": plain[0],
            "defense": defense.name, "config": cfgmod.key_values(defense.config),
            "plugin": [defense.provider, defense.source_hash], "code": code_hash(*TRAIN_DEFENSE_CODE),
            "detectors": {n: [d.name, cfgmod.key_values(d.config), d.provider, d.source_hash]
                          for n, d in detectors.items()},
            "clean_share": share if defense.uses_clean_data else None,
            "fpr": self.fpr if detectors else None}), detectors

    def poison(self, cell: Cell, attack) -> Key:
        parts = {"data": self._data(cell.dataset, "train", "test"), "attack": attack.name,
                 "config": cfgmod.key_values(attack.config), "plugin": [attack.provider, attack.source_hash],
                 "code": code_hash(*POISON_CODE), "seed": cell.seed, "clean_model": None}
        if attack.uses_clean_model:  # crafted against the clean model of the student architecture
            parts["clean_model"] = self.model(cell.dataset, cell.student, cell.seed, None)[0]
        return stage_key("poison", parts)

    def plan(self, cell: Cell) -> Plan:
        if cell in self._plans:
            return self._plans[cell]
        attack = self.configured("attacks", cell.attack)
        poison = self.poison(cell, attack)
        student = self.model(cell.dataset, cell.student, cell.seed, poison[0])
        share = self.profile.clean_share if cell.clean_share is None else cell.clean_share
        clean = self.model(cell.dataset, cell.student, cell.seed, None)
        if cell.detector:
            return self._detection(cell, attack, poison, student, clean, share)
        if cell.defense == NO_DEFENSE:  # `bench attack`: the backdoored model alone
            return Plan(cell, attack, None, poison, student, None, clean, attack.uses_clean_model, None, share)
        defense = self.configured("defenses", cell.defense)
        teacher = None
        if defense.uses_teacher and cell.teacher_source == "supplied" and cell.teacher != cell.student:
            teacher = self.model(cell.dataset, cell.teacher, cell.seed, poison[0])
        arch = self.registry.model(cell.teacher)
        defended, detectors = self.defended(cell, defense, poison, student, share) if defense.trains else (None, {})
        key = stage_key("cell", {
            "model": student[0], "defended": defended and defended[0], "defense": defense.name,
            "config": cfgmod.key_values(defense.config),
            "plugin": [defense.provider, defense.source_hash], "code": code_hash(*CELL_CODE),
            "teacher": [cell.teacher, cell.teacher_source, arch.provider, arch.source_hash],
            "teacher_model": teacher and teacher[0], "clean_share": share,
            "test": self._data(cell.dataset, "test"), "clean_reference": self.clean_reference,
            "reactivation": self.reactivation, "device": self.device_type})
        plan = Plan(cell, attack, defense, poison, student, teacher, clean,
                    self.clean_reference or self.reactivation or attack.uses_clean_model, key, share,
                    defended=defended, detectors=detectors)
        self._plans[cell] = plan
        return plan

    def _detection(self, cell: Cell, attack, poison: Key, student: Key, clean: Key, share: float) -> Plan:
        """A detection cell's plan: its detector and the key of its result (what it inspects, by the
        keys of the poisoning and of the model; the detector's config and code; the decision's FPR)."""
        detector = self.configured("detectors", cell.detector)
        model = detector.level == "input" or detector.uses_model
        key = stage_key("detect", {
            "poison": poison[0], "model": student[0] if model else None, "detector": detector.name,
            "config": cfgmod.key_values(detector.config), "plugin": [detector.provider, detector.source_hash],
            "code": code_hash(*DETECT_CODE), "clean_share": share, "fpr": self.fpr,
            "inputs": self.profile.detect_inputs if detector.level == "input" else None,
            "test": self._data(cell.dataset, "test"), "device": self.device_type})
        plan = Plan(cell, attack, None, poison, student, None, clean, attack.uses_clean_model, key, share, detector)
        self._plans[cell] = plan
        return plan


def unreachable(text: str, registry: Registry) -> str | None:
    """Why no key the current code computes can be the stored entry's key ``text`` (None: one may).
    Judged by what a key holds of the code, the stage's and the plugin's, not by data or configs:
    an entry it passes may still belong to data or settings no grid uses now."""
    try:
        parts = json.loads(text)
    except ValueError:
        return "its key is not a stage key"
    stage = parts.get("stage")
    if "core" in parts:
        return "written by a nadbench whose keys held a version number, not the stages' code"
    if stage == "train":
        fused = "fused" in str(parts.get("precision", "")).split("+")
        if parts.get("code") != code_hash(*TRAIN_CODE, *(FUSED_CODE if fused else ())):
            return "the train stage's code changed"
        kind, name, plugin = "models", parts.get("model"), parts.get("model_plugin")
    elif stage == "train-defense":
        if parts.get("code") != code_hash(*TRAIN_DEFENSE_CODE):
            return "the training-time defense stage's code changed"
        kind, name, plugin = "defenses", parts.get("defense"), parts.get("plugin")
    elif stage == "poison":
        if parts.get("code") != code_hash(*POISON_CODE):
            return "the poison stage's code changed"
        kind, name, plugin = "attacks", parts.get("attack"), parts.get("plugin")
    else:
        return f"stage {stage!r} stores no entries"
    try:
        item = registry.get(kind, name)
    except Exception:  # noqa: BLE001 — not registered (or ambiguous) here: nothing can reach it
        return f"{kind[:-1]} {name!r} is not registered"
    if plugin != [item.provider, item.source_hash]:
        return f"{kind[:-1]} {name!r} is another version or its code changed"
    return None
