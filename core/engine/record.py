"""A cell's recording: its MLflow params, metrics, figures and weights, and a grid's table.

The stages (core/engine.py) compute; this module only writes what they computed to the tracker.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import subprocess
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from ..contract import config as cfgmod
from ..contract.api import Split
from .grid import Cell
from .registry import Registry


def provenance(registry: Registry, cell: Cell) -> dict[str, str]:
    """Who provided each part of a cell (distribution and version, source hash), and nadbench itself."""
    from .. import __version__

    parts = {"dataset": registry.dataset(cell.dataset), "attack": registry.attack(cell.attack),
             "model.student": registry.model(cell.student)}
    if cell.detector:
        parts["detector"] = registry.detector(cell.detector)
    else:
        parts.update({"defense": registry.defense(cell.defense), "model.teacher": registry.model(cell.teacher)})
    params = {"nadbench.version": __version__, "nadbench.git_commit": git_commit() or "unknown"}
    for key, item in parts.items():
        params[f"{key}.provider"] = item.provider
        params[f"{key}.source_hash"] = item.source_hash[:16]
    return params


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the nadbench checkout, when it is one (an editable install); None otherwise."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None



def side_metrics(models: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """``{"teacher": {"acc": a, "asr": b}}`` -> ``{"teacher.acc": a, "teacher.asr": b}``."""
    return {f"{name}.{k}": v for name, values in (models or {}).items() for k, v in values.items()}


def figure_logger(tracker, run_id: str | None, folder: str = "defense"):
    """``ctx.log_figure``: a defense's (or detector's) figure as the artifact ``<folder>/<path>`` of its run."""
    def log_figure(figure, path: str) -> None:
        if tracker and run_id:
            tracker.figure(run_id, figure, f"{folder}/{path}")
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)
    return log_figure


def log_extras(tracker, run_id: str, extras: dict, title: str) -> None:
    """The engine's evaluation of a defense's extra models: metrics ``<axis>.acc``/``<axis>.asr`` (and RA, DER)
    (step = point index), the points as JSON and a plot of ACC and ASR over the axis."""
    from .figures import line_figure

    axis, points = extras["axis"], extras["points"]
    for i, point in enumerate(points):
        tracker.metrics(run_id, {f"{axis}.{k}": v for k, v in point.items() if k != axis}, i)
    tracker.text(run_id, json.dumps(extras, indent=2), f"defense/{axis}_points.json")
    series = {k.upper(): [100 * p[k] for p in points] for k in ("acc", "asr") if all(k in p for p in points)}
    figure = line_figure([p[axis] for p in points], series, axis, "%", title=title)
    tracker.figure(run_id, figure, f"defense/{axis}_acc_asr.png")


def _spread(index: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` entries of ``index`` evenly spaced over its length."""
    return index[torch.linspace(0, len(index) - 1, min(n, len(index))).long().to(index.device)]


def cell_params(runner, cell: Cell, defense) -> dict[str, Any]:
    """What a cell's run records before any stage runs, data loading included (so that every
    failure has a run): the cell, who provided its parts, the defense's config, the profile."""
    return {"dataset": cell.dataset, "attack.name": cell.attack, "defense.name": cell.defense,
            "model.student": cell.student, "model.teacher": cell.teacher,
            "teacher.source": cell.teacher_source or "none", "seed": cell.seed,
            "defense.clean_share": runner.profile.clean_share if cell.clean_share is None else cell.clean_share, "device": str(runner.device),
            **provenance(runner.registry, cell), **cfgmod.flatten(defense.config, "defense"),
            **cfgmod.flatten(runner.profile, "profile")}


def detection_params(runner, cell: Cell, detector) -> dict[str, Any]:
    """What a detection cell's run records before any stage runs (as :func:`cell_params`)."""
    return {"dataset": cell.dataset, "attack.name": cell.attack, "detector.name": cell.detector,
            "detector.level": detector.level, "model.student": cell.student, "seed": cell.seed,
            "detector.clean_share": runner.profile.clean_share if cell.clean_share is None else cell.clean_share,
            "detector.fpr": runner.fpr, "device": str(runner.device), **provenance(runner.registry, cell),
            **cfgmod.flatten(detector.config, "detector"), **cfgmod.flatten(runner.profile, "profile")}


def record_detection(t, run_id: str, plan, result: dict, p, detected, truth: torch.Tensor) -> None:
    """A detection cell's outcome: the poisoning's params, the metrics (``detect.*``), the ROC curve and
    score histograms, the scores with the truth (safetensors) and the result."""
    from safetensors.torch import save

    from .figures import detection_figure

    t.params(run_id, {**cfgmod.flatten(p.attack.config, "attack"), "attack.n_poisoned": len(p.index),
                      "poison.cache_hit": p.hit, "detect.n_inspected": result["n_inspected"]})
    timing = {k.replace("time_", "time.").removesuffix("_s") + "_s": v for k, v in result.items() if k.startswith("time_")}
    t.metrics(run_id, {**{f"detect.{k}": v for k, v in result["detection"].items()}, **timing,
                       **{f"before.{k}": v for k, v in result["before"].items()}})
    positive = "poisoned" if result["level"] == "data" else "triggered"
    t.figure(run_id, detection_figure(detected.scores, truth, detected.threshold, plan.cell.label, positive),
             "detector/roc_and_scores.png")
    t.artifact(run_id, save({"scores": detected.scores.contiguous(), "flagged": detected.flagged.contiguous(),
                             "truth": truth.contiguous()}), "detector/scores.safetensors")
    t.tag(run_id, "nadbench.result", json.dumps(result))


@contextlib.contextmanager
def cell_run(tracker, label: str, params: dict, parent: str | None, run_id: str | None):
    """A cell's run around its stages, yielding (tracker, run id, ``log(key, value, step)``): started
    before any stage (data loading included: the cell's key holds the data's digest), so every failure
    has a run; ended when the block ends, or FAILED (KILLED on Ctrl-C) with the traceback."""
    t = tracker
    if t and run_id is None:
        run_id = t.start(label, params, parent=parent)
    elif t:
        t.params(run_id, params)
    log = (lambda key, value, step=None: t.metrics(run_id, {key: value}, step)) if t else (lambda *a, **k: None)
    try:
        yield t, run_id, log
    except BaseException as exc:  # recorded on the cell's run; the grid goes on (see engine.run_grid)
        if t:
            t.text(run_id, traceback.format_exc(), "error.txt")
            t.tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            t.end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if t:
        t.end(run_id)


def record_backdoor(t, run_id: str, p, before: dict, hits: dict, n_train: int, n_test: int, t_backdoor: float,
                    clean_ref: dict | None) -> None:
    """The poison and train stages' outcome: the attack's config, cache hits, ACC/ASR/RA before the defense."""
    t.params(run_id, {**cfgmod.flatten(p.attack.config, "attack"), "attack.n_poisoned": len(p.index),
                      "poison.cache_hit": p.hit, **hits, "data.n_train": n_train, "data.n_test": n_test})
    t.metrics(run_id, {**{f"before.{k}": v for k, v in before.items()}, "time.backdoor_s": t_backdoor,
                       **({"clean.acc": clean_ref["acc"]} if clean_ref else {})})
    for path, image in p.images.items():
        t.image(run_id, image, f"attack/{path}")


def record_result(t, run_id: str, plan, result: dict, p, repaired, original, train_set: Split, test_set: Split,
                  layers: tuple[str, ...]) -> None:
    """The defense's outcome: metrics, the defense's extra models, figures, both models' weights."""
    from .figures import attention_figure, samples_figure

    cell = plan.cell
    asr_index = (p.attack.targets(test_set.labels) != test_set.labels).nonzero().flatten()  # the ASR set's images
    after = result["after"]
    reactivated = result.get("reactivated") or {}
    t.metrics(run_id, {**{f"after.{k}": v for k, v in after.items()},
                       **{f"reactivated.{k}": v for k, v in reactivated.items() if k != "clean"},
                       **{f"reactivated.clean.{k}": v for k, v in reactivated.get("clean", {}).items()},
                       "time.defense_s": result["time_defense_s"], **side_metrics(result.get("models"))})
    if repaired.extras:
        log_extras(t, run_id, result["extras"], cell.label)
    fig = attention_figure(original, repaired.model, layers,
                           [("clean", test_set.images[asr_index[:1]]), ("triggered", p.triggered.images[:1])],
                           title=f"{cell.label}: attention mean_c|F|^2")
    t.figure(run_id, fig, "attention/attention_maps.png")
    pick = _spread(p.index, 6).to(train_set.images.device)  # across classes: data is sorted by class
    keep = _spread(asr_index, 6)
    asr = _spread(torch.arange(len(p.triggered), device=keep.device), 6)  # the same images, triggered
    fig = samples_figure([
        ("train, clean", train_set.images[pick], train_set.labels[pick]),
        ("train, poisoned", p.poisoned.images[pick], p.poisoned.labels[pick]),
        ("test, clean", test_set.images[keep], test_set.labels[keep]),
        ("test, triggered", p.triggered.images[asr], p.triggered.labels[asr])],
        title=f"{cell.attack}: clean vs poisoned (label shown)")
    t.figure(run_id, fig, "samples/clean_vs_poisoned.png")
    t.weights(run_id, original, "model/backdoored.safetensors")
    t.weights(run_id, repaired.model, "model/defended.safetensors")
    t.tag(run_id, "nadbench.result", json.dumps(result))


def reuse_finished(runner, cells: list[Cell], parent: str | None, results: list[dict], bar) -> list[Cell]:
    """The cells to run: a cell whose result is recorded as FINISHED under its cell key (and no
    ``--rerun``) gets a child run of ``parent`` linked to the original, its result in ``results``."""
    t, todo = runner.tracker, []
    for cell in cells:
        try:
            prior = t.finished_cell(runner.plan(cell).key[0]) if t and not runner.rerun else None
        except Exception:  # noqa: BLE001 — e.g. data that cannot be loaded: the cell runs and records why
            prior = None
        if prior is None:
            todo.append(cell)
            continue
        # The cell as this grid names it: a key also matches a cell of a grid that left an axis
        # at its default (clean share None: the profile's 0.05 is the same subset as 0.05).
        results.append({**t.reuse(prior, cell.label, parent), "cell": dataclasses.asdict(cell)})
        bar.update()
    return todo


def close_grid(t, parent: str | None, cells: list[Cell], results: list[dict], name: str, status: str,
               summarise=None) -> None:
    """Put ``results`` in the grid's cell order and end the grid's run with them: results.json, and
    what ``summarise(tracker, run_id, results, name)`` logs (the commands' tables)."""
    order = {cell: i for i, cell in enumerate(cells)}
    results.sort(key=lambda r: order.get(Cell(**r["cell"]), 0))
    if not t:
        return
    t.text(parent, json.dumps(results, indent=2), "results.json")
    try:
        if results and summarise is not None:
            summarise(t, parent, results, name)
    except Exception as exc:  # noqa: BLE001 — a table that cannot be drawn must not lose the grid's status
        warnings.warn(f"could not log the grid's table: {type(exc).__name__}: {exc}", stacklevel=2)
    t.end(parent, status)
