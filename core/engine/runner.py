"""The grid's driver: expands datasets x attacks x defenses x student/teacher x seeds into cells, checks
them before anything trains, and runs each one the same way (:class:`Runner`: the stages a cell needs
from :class:`~nadbench.engine.pipeline.Pipeline`, then defend or detect, evaluate, record to MLflow);
:func:`run_grid` schedules the cells in process or on an executor and records the grid.

A cell's keys are computed once into a plan (core/engine/plan.py); its recording is core/engine/record.py.
The defense sees only the model and the clean subset; the engine alone evaluates ACC and ASR.
Only the driver records: the stages write to the cache, never to MLflow.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from ..contract import config as cfgmod
from .defending import RESERVED_PREFIXES, apply_defense, measure_defended  # noqa: F401 — re-exported
from .executors import pretrain_fused
from .grid import PROFILES, TEACHER_SOURCES, Cell, Profile, profile, profile_values  # noqa: F401 — re-exported
from .plan import (CELL_CODE, KIND_PREFIX, MODELS_DIR, NO_DEFENSE, POISON_CODE, POISON_DIR, TRAIN_CODE,  # noqa: F401
                   Keys, Plan, configured, overrides_for)
from .pipeline import Pipeline, Trained, _in_force, resolve_device  # noqa: F401 — re-exported
from .record import (cell_params, cell_run, close_grid, detection_params, figure_logger, git_commit,  # noqa: F401
                     log_extras, provenance, record_backdoor, record_detection, record_result, reuse_finished,
                     side_metrics)
from .registry import Registry
from ..contract.sources import cell_tag
from .stages import defend as defend_stage
from .stages import detect as detect_stage
from .stages.defend import attention_layers, classifier_layer  # noqa: F401 — re-exported
from .stages.train import check_learned  # noqa: F401 — re-exported



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


class Runner(Pipeline):
    """The driver of a grid's cells: a :class:`~nadbench.engine.pipeline.Pipeline` (the stages, each
    once per key) that runs a cell's own stage on them (defend or detect, evaluate) and records it.
    ``tracker``: where cells are recorded (None: nowhere); ``rerun``: None, "cells" (defend and
    evaluate again) or "all" (every stage again). The other arguments are the pipeline's."""

    def __init__(self, registry: Registry, prof: Profile, *, tracker=None, rerun: str | None = None, **stages):
        super().__init__(registry, prof, **stages)
        self.tracker, self.rerun = tracker, rerun

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
            logged = None
            if plan.defense.trains:
                repaired, t_defense, n_clean, logged, defended_hit = self.defended_model(plan, log, run_id)
                if defended_hit:  # the run that trained the stored model logged these; this one reports them too
                    for name, value in logged.items():
                        log(name, value, None)
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
            if logged is not None:
                result["defense_logged"] = logged
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


def run_grid(runner: Runner, cells: list[Cell], name: str = "grid", params: dict[str, Any] | None = None,
             results: list[dict] | None = None, failures: list[tuple[Cell, str]] | None = None,
             executor=None, summarise=None) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Run every cell under one parent run. A failing cell is recorded and the grid goes on.

    A cell whose result is already recorded as FINISHED under the same cell key is not recomputed
    (unless ``runner.rerun``): the parent gets a child run linked to the original. The others run in
    this process, in order, each computing the stages of the grid's graph it reads on first use (a
    stage that fails is recorded by the first cell that reads it), or on ``executor`` (worker
    processes or Ray: a scheduler over the graph, ``core/engine/executors.py``).
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
