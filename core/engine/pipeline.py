"""A process's stages: the stage functions of :mod:`nadbench.engine.stages` called through one stage
cache (:class:`~nadbench.engine.store.StageCache`), so each runs once per key in the process and is
shared with other processes through the store, under the run settings in force.

:class:`Pipeline` serves the nodes of a grid's graph (:func:`nadbench.engine.plan.graph`):
:meth:`Pipeline.compute` runs one stored stage, whichever executor schedules it. It records nothing: the
driver (:class:`nadbench.engine.runner.Runner`) adds the cell itself and its recording.
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ..contract import config as cfgmod
from ..contract.api import Defended, DefenseContext
from ..training import data as datamod
from ..training.settings import RunSettings, current, use
from ..training.train import numerics
from . import poisoning as poisonmod
from .grid import Cell, Profile
from .plan import MODELS_DIR, POISON_DIR, Keys, Node, Plan
from .poisoning import Poisoning
from .record import figure_logger
from .registry import Registry
from .stages import defend as defend_stage
from .stages import detect as detect_stage
from .stages import poison as poison_stage
from .stages import train as train_stage
from .stages import train_defense
from .store import StageCache, Store


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("--device cuda asked for, but torch sees no CUDA device; valid: auto, cpu")
    return device


def _in_force(method):
    """Run a stage method under the pipeline's own settings (``nadbench.training.settings.use``): the
    training loop and the evaluation read them, whatever the process default is."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with use(self.settings):
            return method(self, *args, **kwargs)
    return wrapper


class Trained(NamedTuple):
    """A train stage's model (eval mode), its ACC/ASR where evaluated, and whether it was stored."""

    model: torch.nn.Module
    metrics: dict[str, float]
    hit: bool


class TrainedDefense(NamedTuple):
    """A training-time defense's stage: its model, its seconds, the clean images it got, the numbers it
    logged without a step (stored with the model: a cache hit reports them too), whether it was stored."""

    defended: Defended
    seconds: float
    n_clean: int
    logged: dict[str, float]
    hit: bool


class Pipeline:
    """The stages of one process for a profile, a device and the run settings: poison -> train (the
    backdoored model, a teacher of another architecture, the clean one an attack may craft against, a
    training-time defense's) -> the evaluations a cell reads. Each stage goes through one
    :class:`~nadbench.engine.store.StageCache`: computed once per key, across processes, and kept in
    memory for the cells of this process. A cell's keys are computed once into its
    :class:`~nadbench.engine.plan.Plan`, which the stages take.

    ``overrides``: ``--set`` values per plugin, keyed ``attack.NAME`` / ``defense.NAME`` (or by the
    plain name, when no attack and defense share it); they win over the profile's settings."""

    tracker = None  # the driver's, where a stage's plugin logs figures (None: nowhere)

    def __init__(self, registry: Registry, prof: Profile, *, device: torch.device | None = None,
                 settings: RunSettings | None = None, data_root=None,
                 overrides: dict[str, dict[str, str]] | None = None, progress=True,
                 cache_dir: Path | None = None, clean_reference: bool = False,
                 reactivation: bool = False, fpr: float = 0.05):
        settings = settings or current()
        device = device or resolve_device(settings.device)
        # How this pipeline computes (nadbench.training.settings), in force around each of its stages (@_in_force)
        self.settings = settings.replace(device=str(device))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.registry, self.profile, self.device = registry, prof, device
        self.data_root, self.progress = data_root, progress
        self.overrides = overrides or {}
        self.clean_reference = clean_reference
        self.reactivation = reactivation  # the retuning check after each defense (nadbench.engine.reactivation)
        self.cache_root = Path(cache_dir or datamod.cache_dir())
        self.cache = StageCache(Store(self.cache_root))
        self.datasets = datamod.GridData(registry, prof, data_root, device)
        self.keys = Keys(registry, prof, device.type, numerics(self.settings, device), self.overrides, clean_reference,
                         self.datasets.digests, reactivation, fpr)
        self.fpr = fpr  # the engine's decision for detectors that make none: this false-positive rate
        self._metrics: dict[tuple, dict] = {}    # evaluations, by the keys of what they measure
        self._armed: tuple[tuple, Poisoning] | None = None  # the last cell's (it measures, retunes, records)

    def plan(self, cell: Cell | Plan) -> Plan:
        return cell if isinstance(cell, Plan) else self.keys.plan(cell)

    def data(self, name: str):
        """(spec, train, test) of a dataset as the profile limits it, on the pipeline's device."""
        return self.datasets.on_device(name)

    def compute(self, node: Node) -> None:
        """Run, or find stored, one stored stage of the graph (a node that is not a cell)."""
        plan = self.plan(node.cell)
        {"clean": self.clean_model, "poison": self.poisoning, "backdoored": self.backdoored,
         "teacher": lambda p: self.supplied(p, node.arch), "defended": self.defended_model}[node.stage](plan)

    # -- stages -----------------------------------------------------------------------------------
    @_in_force
    def poisoning(self, cell: Cell | Plan) -> Poisoning:
        """The poison stage of (attack config, dataset, seed[, clean model])."""
        plan = self.plan(cell)
        spec, train_set, test_set = self.data(plan.cell.dataset)
        key = plan.poison[0]
        return self.cache.get(POISON_DIR, plan.poison, lambda: poison_stage.poison(
            key, plan.attack, spec, train_set, test_set, seed=plan.cell.seed, device=self.device,
            clean_model=lambda: self.clean_model(plan).model, progress=self.progress,
            load_dataset=lambda name: self.registry.dataset(name).load(self.data_root)),
            lambda stored: poisonmod.restore(key, plan.attack, train_set, stored, self.device, spec.num_classes),
            {"attack": plan.attack.name})[0]

    def _trained(self, dataset: str, arch: str, seed: int, stage: tuple[str, str], data, desc: str,
                 attack=None, index=None):
        """The train stage ``stage`` (key, text): a model of ``arch`` trained on ``data()`` (a callable,
        so that a cache hit builds nothing) with ``attack`` (its step over the poisoned rows ``index``,
        its epochs); what an attack that learns its trigger learnt is put back into ``attack`` on a hit.
        Returns (model in eval mode, cache hit)."""
        spec, _, test_set = self.data(dataset)
        model = train_stage.initial(self.registry.model(arch), spec, seed, self.device)

        def compute():
            entry = train_stage.trained(model, data(), self.profile, seed=seed, test_set=test_set, attack=attack,
                                        index=index, desc=desc, progress=self.progress)
            return {k: v.clone() for k, v in entry.items()}, entry

        def load(stored):  # an entry whose weights do not fit the model is reported and recomputed
            fits = _load_state(model, train_stage.part(stored, ""), self.cache.store.path(MODELS_DIR, stage[0]))
            return {k: v.clone() for k, v in stored.items()} if fits else None
        entry, hit = self.cache.get(MODELS_DIR, stage, compute, load, {"arch": arch})
        model.load_state_dict(train_stage.part(entry, ""))
        train_stage.restore_learned(attack, entry, self.device)
        return model.eval(), hit

    def model_entry(self, stage: tuple[str, str]) -> dict:
        """What the train stage ``stage`` stored (in this process's memory once it ran or was loaded)."""
        return self.cache.memory[MODELS_DIR][stage[0]]

    @_in_force
    def clean_model(self, cell: Cell | Plan) -> Trained:
        """A model trained on the clean training set: what Trojan and CL craft against, and the
        reference ACC of the benchmark (metrics {"acc"})."""
        plan = self.plan(cell)
        c = plan.cell
        spec, train_set, test_set = self.data(c.dataset)
        model, hit = self._trained(c.dataset, c.student, c.seed, plan.clean, lambda: train_set, f"clean {c.student}")
        if plan.clean[0] not in self._metrics:
            self._metrics[plan.clean[0]] = {"acc": defend_stage.accuracy(model, test_set)}
        return Trained(model, self._metrics[plan.clean[0]], hit)

    @_in_force
    def supplied(self, cell: Cell | Plan, arch: str):
        """The supplier's model of ``arch`` for this cell, backdoored on the cell's poisoning (the
        student's own backdoored model when ``arch`` is the student). Returns (model, cache hit)."""
        plan = self.plan(cell)
        c = plan.cell
        stage = plan.student if arch == c.student else (plan.teacher or self.keys.model(c.dataset, arch, c.seed,
                                                                                       plan.poison[0]))
        p = self.poisoning(plan)
        return self._trained(c.dataset, arch, c.seed, stage, lambda: p.poisoned, f"backdoor {c.attack}/{arch}",
                             train_stage.attack_for(p.attack, arch, c.student), p.index)

    @_in_force
    def armed(self, cell: Cell | Plan) -> Poisoning:
        """The cell's poisoning with the ASR set its student is measured on (``stages.train.armed``)."""
        plan = self.plan(cell)
        p = self.poisoning(plan)
        if not p.attack.learns_trigger:
            return p
        key = (plan.poison[0], plan.student[0])
        if self._armed is None or self._armed[0] != key:  # once per cell, however many stages ask
            self.supplied(plan, plan.cell.student)
            self._armed = key, train_stage.armed(p, self.model_entry(plan.student), self.device)
        return self._armed[1]

    @_in_force
    def backdoored(self, cell: Cell | Plan) -> Trained:
        """The backdoored model of (dataset, attack config, student, seed, profile), with its metrics."""
        plan = self.plan(cell)
        spec, train_set, test_set = self.data(plan.cell.dataset)
        model, hit = self.supplied(plan, plan.cell.student)
        if plan.student[0] not in self._metrics:
            self._metrics[plan.student[0]] = defend_stage.measure(model, test_set, self.armed(plan))
        return Trained(model, self._metrics[plan.student[0]], hit)

    @_in_force
    def reactivated(self, plan: Plan, model: torch.nn.Module) -> dict:
        """The reactivation check of a repaired ``model`` (``stages.defend.retuned``), and under ``clean``
        the same for the clean model of the student's architecture (computed once per poisoning)."""
        c = plan.cell
        _, _, test_set = self.data(c.dataset)
        p = self.armed(plan)
        ref = ("reactivated", plan.clean[0], plan.poison[0])
        if ref not in self._metrics:
            self._metrics[ref] = defend_stage.retuned(self.clean_model(plan).model, p, test_set, c.seed,
                                                      self.profile, self.progress)
        return {**defend_stage.retuned(model, p, test_set, c.seed, self.profile, self.progress),
                "clean": self._metrics[ref]}

    def forget(self, cells: list[Cell]) -> int:
        """Remove the stored stages these cells use (``--rerun all``), so each is recomputed once.
        Returns the number of keys removed."""
        keys = {(stage, key[0]) for plan in map(self.plan, cells) for stage, key in plan.stored()}
        for stage, key in keys:
            self.cache.forget(stage, key)
        self._metrics.clear()
        self._armed = None
        return len(keys)

    @_in_force
    def defended_model(self, plan: Plan, log=lambda *a, **k: None, run_id: str | None = None):
        """The model a cell's training-time defense trains on its poisoned set (``stages.train_defense``),
        stored under ``plan.defended``, with what was stored beside it."""
        c = plan.cell
        spec, train_set, test_set = self.data(c.dataset)
        p = self.poisoning(plan)
        clean = defend_stage.clean_data(train_set, plan.clean_share, c.seed)
        model = train_stage.initial(self.registry.model(c.student), spec, c.seed, self.device)

        def compute():
            plain = lambda: copy.deepcopy(self.supplied(plan, c.student)[0])  # noqa: E731
            dctx = detect_stage.context(self.registry, spec, arch=c.student, seed=c.seed, device=self.device,
                                        log_metric=log, log_figure=figure_logger(self.tracker, run_id, "detector"),
                                        progress=self.progress)
            detect = train_defense.detectors_for(plan.defense, plan.detectors, p.poisoned, clean, plain, dctx, self.fpr)
            ctx = train_defense.context(self.registry, spec, arch=c.student, seed=c.seed, device=self.device,
                                        schedule=train_stage.schedule(self.profile), plain_model=plain, detect=detect,
                                        log_metric=log, log_figure=figure_logger(self.tracker, run_id),
                                        progress=self.progress)
            entry = train_defense.stored(plan.defense, p.poisoned, clean, ctx)
            return {k: v.clone() for k, v in entry.items()}, entry

        def load(stored):
            path = self.cache.store.path(MODELS_DIR, plan.defended[0])
            return {k: v.clone() for k, v in stored.items()} if _load_state(
                model, train_stage.part(stored, ""), path) else None
        entry, hit = self.cache.get(MODELS_DIR, plan.defended, compute, load, {"defense": plan.defense.name})
        model.load_state_dict(train_stage.part(entry, ""))
        n_clean = len(clean) if plan.defense.uses_clean_data else 0
        return TrainedDefense(Defended(model.eval()), float(entry["defense/seconds"]), n_clean,
                              train_defense.logged(entry), hit)

    def defense_context(self, cell: Cell | Plan, log, run_id: str | None = None) -> DefenseContext:
        """What the cell's defense may reach (:func:`nadbench.engine.stages.defend.context`), with the
        supplier's models it needs (the teacher is trained now if it is not stored)."""
        plan = self.plan(cell)
        cell = plan.cell
        supplied = {arch: self.supplied(plan, arch)[0] for arch in defend_stage.supplied_archs(plan.defense, cell)}
        spec = self.registry.dataset(cell.dataset)
        return defend_stage.context(self.registry, spec, student=cell.student, teacher=cell.teacher, seed=cell.seed,
                                    device=self.device, supplied=supplied, log_metric=log,
                                    log_figure=figure_logger(self.tracker, run_id), progress=self.progress)



def _load_state(model: torch.nn.Module, state: dict, path: Path) -> bool:
    """Load a stored state dict; one that does not fit the model is reported and not used."""
    try:
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
        return True
    except RuntimeError as exc:
        warnings.warn(f"ignoring cache entry {path}: {str(exc).splitlines()[0]}; recomputing it", stacklevel=3)
        return False
