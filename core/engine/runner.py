"""The grid runner: expands datasets x attacks x defenses x student/teacher x seeds into cells and
runs each one the same way: poison, train (or reuse) the backdoored model, evaluate, defend,
evaluate again, record everything to MLflow.

A cell's keys are computed once into a plan (core/plan.py); its recording is core/record.py.
The defense sees only the model and the clean subset; the engine alone evaluates ACC and ASR.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..contract import config as cfgmod
from ..training import data as datamod
from . import poisoning as poisonmod
from ..contract.api import Defended, DefenseContext
from .defending import RESERVED_PREFIXES, apply_defense, measure_defended  # noqa: F401 — re-exported
from .executors import pretrain_fused
from .grid import PROFILES, TEACHER_SOURCES, Cell, Profile, profile, profile_values  # noqa: F401 — re-exported
from .plan import (CELL_CODE, KIND_PREFIX, MODELS_DIR, NO_DEFENSE, POISON_CODE, POISON_DIR, TRAIN_CODE,  # noqa: F401
                   Keys, Plan, configured, overrides_for)
from .poisoning import Poisoning
from .record import (cell_params, cell_run, close_grid, detection_params, figure_logger, git_commit,  # noqa: F401
                     log_extras, provenance, record_backdoor, record_detection, record_result, reuse_finished,
                     side_metrics)
from .registry import Registry
from ..contract.sources import cell_tag
from ..training.settings import RunSettings, current, use
from .stages import defend as defend_stage
from .stages import detect as detect_stage
from .stages import poison as poison_stage
from .stages import train as train_stage
from .stages import train_defense
from .stages.defend import attention_layers, classifier_layer  # noqa: F401 — re-exported
from .stages.train import check_learned  # noqa: F401 — re-exported
from .store import StageCache, Store
from ..training.train import numerics



def check_target(attack, dataset) -> None:
    """An attack's target must be a label of the dataset (checked before anything trains)."""
    target, n = attack.config.target, dataset.num_classes
    if not 0 <= target < n:
        raise cfgmod.ConfigError(f"{attack.name}.target = {target} is out of range for dataset {dataset.name!r}, "
                                 f"which has {n} classes: valid targets are 0..{n - 1}")


def check_attack(attack, dataset) -> None:
    """Everything about a configured attack on a dataset that can be checked before anything trains:
    its target, then the attack's own ``check`` (``bench run`` and ``bench attack``)."""
    check_target(attack, dataset)
    attack.check(dataset)


def check_grid(registry: Registry, cells: list[Cell], overrides: dict[str, dict[str, str]],
               prof: Profile | None = None) -> None:
    """Everything that can be checked before anything trains: every plugin config (with the profile's
    settings and the overrides the Runner will use), every attack against its dataset (its target and
    ``Attack.check``), every model's attention layers, and every defense against its student/teacher
    pair (NAD: one beta per attention layer). Raises ``ConfigError`` or ``PluginError``."""
    layers: dict[tuple[str, str], tuple[str, ...]] = {}

    def layers_of(arch, dataset):
        if (arch, dataset) not in layers:
            layers[arch, dataset] = attention_layers(registry, arch, dataset)
        return layers[arch, dataset]

    for cell in cells:
        attack = configured(registry, "attacks", cell.attack, overrides, prof)
        check_attack(attack, registry.dataset(cell.dataset))
        if cell.detector:
            configured(registry, "detectors", cell.detector, overrides, prof)
            continue
        defense_cls = registry.defense(cell.defense)
        defense = configured(registry, "defenses", cell.defense, overrides, prof)
        if defense.trains:
            check_training_defense(registry, defense, attack, overrides, prof)
        defense.check(layers_of(cell.student, cell.dataset), layers_of(cell.teacher, cell.dataset))
        if defense_cls.uses_classifier and not classifier_layer(registry, cell.student, cell.dataset):
            raise cfgmod.ConfigError(f"defense {defense_cls.name!r} prunes the inputs of the model's classifier "
                                     f"layer, and {cell.student!r} declares none (ModelSpec.classifier_layer)")


def check_training_defense(registry: Registry, defense, attack, overrides=None, prof: Profile | None = None) -> None:
    """A training-time defense pairs with an attack that poisons data, never with one that runs the
    training of its model (the defender runs it here: two threat models), and runs data detectors only."""
    if attack.controls_training:
        raise cfgmod.ConfigError(f"defense {defense.name!r} trains the model on the supplied set, and attack "
                                 f"{attack.name!r} runs the training of its model (its threat model has the attacker "
                                 "train): pair training-time defenses with attacks that poison data (--defenses all "
                                 "skips such pairs)")
    for name in defense.uses_detectors:
        detector = configured(registry, "detectors", name, overrides, prof)
        if detector.level != "data":
            raise cfgmod.ConfigError(f"defense {defense.name!r} runs detector {name!r}, which screens inputs: a "
                                     "training-time defense runs data detectors (bench list detectors)")


def expand(registry: Registry, datasets, attacks, defenses, students, teachers, seeds,
           teacher_sources=("supplied",), clean_shares=None, picked_by_all=(), detectors=()) -> list[Cell]:
    """All cells of the grid. Teacher architectures and teacher sources multiply only the defenses
    that use a teacher (``Defense.uses_teacher``); the others get one cell with teacher = student.
    ``clean_shares`` (None: the profile's share) multiplies every defense and detector. An attack in
    ``picked_by_all`` (chosen by ``--attacks all``, not by name) runs only on its ``all_datasets``.
    Each detector adds a detection cell per (dataset, attack, student, share, seed), beside the defenses'."""
    cells = []
    # One cell per method and variants: NAME@all2all@bb and NAME@bb@all2all are one canonical spelling.
    attacks = list(dict.fromkeys(registry.canonical("attacks", a) for a in attacks))
    defenses = list(dict.fromkeys(registry.canonical("defenses", de) for de in defenses))
    detectors = list(dict.fromkeys(registry.canonical("detectors", de) for de in detectors))
    methods = [(de, "") for de in defenses] + [(NO_DEFENSE, de) for de in detectors]
    for d, a, (de, detector), s, share, seed in itertools.product(datasets, attacks, methods, students,
                                                                  clean_shares or [None], seeds):
        only = registry.attack(a).all_datasets
        if a in picked_by_all and only and d not in only:
            continue
        if detector:
            cells.append(Cell(d, a, NO_DEFENSE, s, s, seed, "", share, detector))
        elif registry.defense(de).uses_teacher:
            for t, src in itertools.product(teachers or [s], teacher_sources or ("supplied",)):
                cells.append(Cell(d, a, de, s, t, seed, src, share))
        else:
            cells.append(Cell(d, a, de, s, s, seed, "", share))
    return cells


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("--device cuda asked for, but torch sees no CUDA device; valid: auto, cpu")
    return device


def _in_force(method):
    """Run a Runner's stage method under the runner's own settings (``nadbench.training.settings.use``): the
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


class Runner:
    """Runs cells as content-keyed stages (the functions of :mod:`nadbench.engine.stages`): poison -> train
    (the backdoored model, and the clean one an attack may craft against) -> defend -> evaluate ->
    record. Each stage goes through one :class:`~nadbench.engine.store.StageCache`: computed once per key,
    across processes, and kept in memory for the cells of this process. A cell's keys are computed
    once into its :class:`~nadbench.engine.plan.Plan`, which the stages take. Only the driver records.

    ``overrides``: ``--set`` values per plugin, keyed ``attack.NAME`` / ``defense.NAME`` (or by the
    plain name, when no attack and defense share it); they win over the profile's settings."""

    def __init__(self, registry: Registry, prof: Profile, *, device: torch.device | None = None,
                 settings: RunSettings | None = None, data_root=None,
                 overrides: dict[str, dict[str, str]] | None = None, tracker=None, progress=True,
                 cache_dir: Path | None = None, clean_reference: bool = False, rerun: str | None = None,
                 reactivation: bool = False, fpr: float = 0.05):
        settings = settings or current()
        device = device or resolve_device(settings.device)
        # How this runner computes (nadbench.training.settings), in force around each stage it runs (@_in_force)
        self.settings = settings.replace(device=str(device))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.registry, self.profile, self.device = registry, prof, device
        self.data_root, self.tracker, self.progress = data_root, tracker, progress
        self.overrides = overrides or {}
        self.clean_reference = clean_reference
        self.reactivation = reactivation  # the retuning check after each defense (nadbench.engine.reactivation)
        self.rerun = rerun  # None | "cells" (defend + evaluate again) | "all" (every stage again)
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
        """(spec, train, test) of a dataset as the profile limits it, on the runner's device."""
        return self.datasets.on_device(name)

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
    def run_cell(self, cell: Cell, parent: str | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Run one cell and log it as a child run of ``parent`` (or into the open run ``run_id``)."""
        if cell.detector:
            return self.detect_cell(cell, parent, run_id)
        params = cell_params(self, cell, self.keys.configured("defenses", cell.defense))
        with cell_run(self.tracker, cell.label, params, parent, run_id) as (t, run_id, log):
            plan = self.plan(cell)
            if t:
                t.tag(run_id, "nadbench.cell_key", plan.key[0])
                t.tag(run_id, "nadbench.sources", cell_tag(self.registry.attack(cell.attack),
                                                           self.registry.defense(cell.defense)))
            start = time.perf_counter()
            spec, train_set, test_set = self.data(cell.dataset)
            model, before, hit = self.backdoored(plan)
            p = self.armed(plan)
            teacher_hit = self.supplied(plan, cell.teacher)[1] if plan.teacher else None
            t_backdoor = time.perf_counter() - start
            clean_ref = self.clean_model(plan).metrics if self.clean_reference else None
            if t:
                record_backdoor(t, run_id, p, before, {"backdoor.cache_hit": hit, "teacher.cache_hit": teacher_hit},
                                len(train_set), len(test_set), t_backdoor, clean_ref)
            original = copy.deepcopy(model)
            if plan.defense.trains:
                repaired, t_defense, n_clean = self.defended_model(plan, log, run_id)
                measured = defend_stage.measured(repaired, test_set, p, before)
                layers = defend_stage.layers_of(self.registry, spec, cell.student, repaired.model)
            else:
                ctx = self.defense_context(plan, log, run_id)
                repaired, t_defense, n_clean, measured = defend_stage.cell(plan.defense, model, train_set, test_set,
                                                                           p, before, plan.clean_share, cell.seed, ctx)
                layers = ctx.student_layers
            result = {"cell": dataclasses.asdict(cell), "cell_key": plan.key[0], "before": before, **measured,
                      "time_backdoor_s": t_backdoor, "time_defense_s": t_defense, "backdoor_cache_hit": hit,
                      "n_clean": n_clean, "clean_model": clean_ref, "status": "FINISHED",
                      "profile": self.profile.name, "defense_config": cfgmod.key_values(plan.defense.config)}
            if self.reactivation:
                start = time.perf_counter()
                result["reactivated"] = self.reactivated(plan, repaired.model)
                result["time_reactivation_s"] = time.perf_counter() - start
            if t:
                record_result(t, run_id, plan, result, p, repaired, original, train_set, test_set, layers)
            return result

    @_in_force
    def detect_cell(self, cell: Cell, parent: str | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Run one detection cell (``cell.detector``) and log it as :meth:`run_cell` logs a defense's."""
        plan = self.plan(cell)
        with cell_run(self.tracker, cell.label, detection_params(self, cell, plan.detector), parent, run_id) as (
                t, run_id, log):
            if t:
                t.tag(run_id, "nadbench.cell_key", plan.key[0])
                t.tag(run_id, "nadbench.sources", cell_tag(self.registry.attack(cell.attack),
                                                           self.registry.detector(cell.detector)))
            spec, train_set, test_set = self.data(cell.dataset)
            model, before, hit = self.backdoored(plan) if plan.uses_model else (None, {}, None)
            p = self.armed(plan)
            ctx = detect_stage.context(self.registry, spec, arch=cell.student if plan.uses_model else "",
                                       seed=cell.seed, device=self.device, log_metric=log,
                                       log_figure=figure_logger(self.tracker, run_id, "detector"),
                                       progress=self.progress)
            detected, truth, metrics = detect_stage.detect(plan.detector, p, model, train_set, test_set,
                                                           plan.clean_share, cell.seed, ctx, self.fpr,
                                                           self.profile.detect_inputs)
            result = {"kind": "detection", "cell": dataclasses.asdict(cell), "cell_key": plan.key[0],
                      "level": plan.detector.level, "detection": metrics, "before": before,
                      "own_decision": detected.own_decision, "threshold": detected.threshold, "fpr_target": self.fpr,
                      "n_inspected": len(truth), "n_positive": int(truth.sum()), "backdoor_cache_hit": hit,
                      ("time_per_input_s" if plan.detector.level == "input" else "time_detect_s"): detected.seconds,
                      "status": "FINISHED", "profile": self.profile.name,
                      "detector_config": cfgmod.key_values(plan.detector.config)}
            if t:
                record_detection(t, run_id, plan, result, p, detected, truth)
            return result

    @_in_force
    def defended_model(self, plan: Plan, log=lambda *a, **k: None, run_id: str | None = None):
        """The model a cell's training-time defense trains on its poisoned set (``stages.train_defense``),
        stored under ``plan.defended``. Returns (Defended, the defense's seconds, clean images it got)."""
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
            defended, seconds = train_defense.trained(plan.defense, p.poisoned, clean, ctx)
            entry = {**defended.model.state_dict(), "defense/seconds": torch.tensor(seconds)}
            return {k: v.detach().clone() for k, v in entry.items()}, entry

        def load(stored):
            path = self.cache.store.path(MODELS_DIR, plan.defended[0])
            return {k: v.clone() for k, v in stored.items()} if _load_state(
                model, train_stage.part(stored, ""), path) else None
        entry, _ = self.cache.get(MODELS_DIR, plan.defended, compute, load, {"defense": plan.defense.name})
        model.load_state_dict(train_stage.part(entry, ""))
        n_clean = len(clean) if plan.defense.uses_clean_data else 0
        return Defended(model.eval()), float(entry["defense/seconds"]), n_clean

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


def run_grid(runner: Runner, cells: list[Cell], name: str = "grid", params: dict[str, Any] | None = None,
             results: list[dict] | None = None, failures: list[tuple[Cell, str]] | None = None,
             executor=None, summarise=None) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Run every cell under one parent run. A failing cell is recorded and the grid goes on.

    A cell whose result is already recorded as FINISHED under the same cell key is not recomputed
    (unless ``runner.rerun``): the parent gets a child run linked to the original. The others run in
    this process, or on ``executor`` (worker processes or Ray, see ``core/engine/executors.py``).
    ``summarise(tracker, parent_run_id, results, name)`` logs the grid's summary on its parent run at
    the end (``bench run`` passes :func:`nadbench.commands.tables.log_grid`: Table 1, the leaderboard).

    ``results`` and ``failures`` fill as cells end, so a caller interrupted by Ctrl-C or SIGTERM
    (a ``KeyboardInterrupt``: the current cell's run and the parent end KILLED) keeps what finished.
    """
    t = runner.tracker
    results = [] if results is None else results
    failures = [] if failures is None else failures
    parent = t.start(name, params, tags={"nadbench.grid": "1"}) if t else None
    status = "KILLED"  # unless the loop completes
    bar = tqdm(total=len(cells), desc="grid", unit="cell", disable=not runner.progress, dynamic_ncols=True)
    try:
        todo = reuse_finished(runner, cells, parent, results, bar)
        if runner.rerun == "all":
            runner.forget(todo)
        if runner.settings.fused and todo:  # --fused: the models the cells to run need, trained together first
            for line in pretrain_fused(runner, todo):
                tqdm.write(f"note: {line}", file=sys.stderr)
        if len(todo) < len(cells):
            tqdm.write(f"resuming: {len(cells) - len(todo)} cell(s) already recorded, {len(todo)} to run",
                       file=sys.stderr)

        def done(cell: Cell, result: dict | None, error: str | None) -> None:
            if error is None:
                results.append(result)
            else:
                failures.append((cell, error))
                tqdm.write(f"cell {cell.label} failed: {error}", file=sys.stderr)
            bar.update()

        if executor is None:
            for cell in todo:
                bar.set_postfix_str(cell.label)
                try:
                    done(cell, runner.run_cell(cell, parent), None)
                except Exception as exc:
                    done(cell, None, f"{type(exc).__name__}: {exc}")
        else:
            executor.run(runner, todo, parent, done)
        status = "FAILED" if failures else "FINISHED"
    finally:
        bar.close()
        close_grid(t, parent, cells, results, name, status, summarise)
    return results, failures
