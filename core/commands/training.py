"""`bench train`: a model trained on a set a practitioner was handed, part of which may be poisoned,
with a training-time defense, through the grid's own pieces (the train stage's schedule and seeding,
``stages.train_defense``, the one evaluation), so a model trained here means what a grid cell's does."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..contract.api import DatasetSpec, Defended, Split
from ..contract.config import flatten
from ..engine.defending import measure_defended
from ..engine.grid import Profile
from ..engine.record import cell_run, figure_logger
from ..engine.registry import Registry
from ..engine.stages import detect as detect_stage
from ..engine.stages import train as train_stage
from ..engine.stages import train_defense
from ..training.models import save_weights
from .practitioner import UserData, _attention, _record, measured_data
from .userfiles import HandoverError

NONE = "none"  # --defense none: plain training, the baseline a defense is read against


def normalisation(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a set's pixels in [0, 1], for a folder without a registered dataset."""
    x = split.images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def training_defense(registry: Registry, name: str):
    """The class of the training-time defense ``name`` (None for ``none``: plain training), or a one-line
    HandoverError naming the valid ones for a defense that repairs a trained model."""
    if name == NONE:
        return None
    cls = registry.defense(name)
    if not cls.trains:
        trains = [n for n in registry.names("defenses") if registry.defense(n).trains]
        raise HandoverError(f"{name} repairs a trained model (use bench defend); bench train takes a training-time "
                            f"defense: {', '.join([*trains, NONE])}")
    return cls


def train_file(registry: Registry, *, data: UserData, arch: str, defense_name: str, overrides: dict[str, str],
               detector_overrides: dict[str, dict[str, str]], clean: UserData | None, test: UserData | None,
               triggered: UserData | None, target: int | None, prof: Profile, mean, std, seed: int,
               device: torch.device, out: Path, fpr: float = 0.05, baseline: bool = False, make_tracker=None,
               progress: bool = True) -> dict[str, Any]:
    """Train a model of ``arch`` on ``data`` with a training-time defense (``none``: plain training) and the
    profile's schedule; measure it on the user's test (and triggered) data, write its weights and a report
    beside them, and record it as one MLflow run. With ``baseline`` (or when the defense asked for it) the
    plainly trained model is measured too."""
    start_all = time.perf_counter()
    cls = training_defense(registry, defense_name)
    defense = cls.from_overrides(overrides) if cls else None
    if (uses_clean := defense is not None and defense.uses_clean_data) and clean is None:
        raise HandoverError(f"{defense_name} uses clean data (its detector's threshold): give --clean")
    detectors = _detectors(registry, defense, detector_overrides)
    measured = measured_data(data, test, triggered, target, {}, seed)  # without --test, a held-out slice
    on_device = measured.to(device)
    train_set = on_device.clean
    mean, std = (mean, std) if mean else normalisation(train_set)
    dataset = DatasetSpec(data.where, None, data.num_classes, mean, std, image_size=int(train_set.images.shape[-1]))
    clean_split = clean.split.to(device) if uses_clean else train_set.subset(slice(0, 0))
    spec = registry.model(arch)
    plain_model = _Plain(spec, dataset, train_set, on_device.test, prof, seed, device, progress)
    params = {"data": data.where, "data.n_train": len(train_set), "model.arch": arch, "defense.name": defense_name,
              "defense.provider": defense.provider if defense else "", "seed": seed, "device": str(device),
              "profile": prof.name, "data.clean": clean.where if uses_clean else "", "nadbench.version": __version__,
              **(flatten(defense.config, "defense") if defense else {})}
    tracker = make_tracker() if make_tracker else None
    with cell_run(tracker, f"bench train {arch} on {Path(data.where).name}", params, None, None) as (t, run_id, log):
        start, (log_defense, logged) = time.perf_counter(), _summarised(log)
        if defense is None:
            trained, seconds = Defended(plain_model()), time.perf_counter() - start
        else:
            copied = lambda: copy.deepcopy(plain_model())  # noqa: E731
            dctx = detect_stage.context(registry, dataset, arch=arch, seed=seed, device=device, log_metric=log,
                                        log_figure=figure_logger(t, run_id, "detector"), progress=progress)
            ctx = train_defense.context(registry, dataset, arch=arch, seed=seed, device=device, progress=progress,
                                        schedule=train_stage.schedule(prof), plain_model=copied, log_metric=log_defense,
                                        detect=train_defense.detectors_for(defense, detectors, train_set, clean_split,
                                                                           copied, dctx, fpr),
                                        log_figure=figure_logger(t, run_id))
            trained, seconds = train_defense.trained(defense, train_set, clean_split, ctx)
        if baseline:
            plain_model()
        before = on_device.measure(plain_model()) if plain_model.model and defense is not None else None
        save_weights(trained.model, out, {"nadbench.version": __version__, "arch": arch, "data": data.where,
                                          "seed": str(seed), "profile": prof.name, "defense": defense_name,
                                          "defense.config": json.dumps(dataclasses.asdict(defense.config) if defense
                                                                       else {})})
        report = {"data": data.where, "trained": str(out), "defense": defense_name, "arch": arch, "profile": prof.name,
                  "n_train": len(train_set), "n_clean": len(clean_split), "n_test": len(measured.test),
                  "n_triggered": len(measured.triggered[0]) if measured.triggered else 0, "defense_logged": logged,
                  "before": before, "time_defense_s": seconds, "time_total_s": time.perf_counter() - start_all,
                  "notes": measured.notes, **measure_defended(trained, on_device.measure, before)}
        figure = _attention(plain_model(), trained.model, spec, on_device, out, report,
                            f"{defense_name} on {data.where}") if before is not None else None
        out.with_suffix(".report.json").write_text(json.dumps(report, indent=2))
        if t:
            _record(t, run_id, report, trained, figure, seconds, f"{defense_name} on {data.where}")
    return report


def _summarised(log) -> tuple[Any, dict[str, float]]:
    """(``log``, also keeping what is logged without a step in the dict: the rows a defense dropped or
    isolated, which the report carries; the dict)."""
    summary: dict[str, float] = {}

    def log_metric(name, value, step=None):
        if step is None:
            summary[name] = float(value)
        log(name, value, step)
    return log_metric, summary


class _Plain:
    """The model plain training on the set gives (the train stage's seeding and schedule), trained on the first call."""

    def __init__(self, spec, dataset: DatasetSpec, data: Split, test: Split, prof: Profile, seed: int,
                 device: torch.device, progress: bool):
        self.args, self.model = (spec, dataset, data, test, prof, seed, device, progress), None

    def __call__(self) -> torch.nn.Module:
        if self.model is None:
            spec, dataset, data, test, prof, seed, device, progress = self.args
            self.model = train_stage.initial(spec, dataset, seed, device)
            train_stage.trained(self.model, data, prof, seed=seed, test_set=test, desc="plain training",
                                progress=progress)
            self.model.eval()
        return self.model


def _detectors(registry: Registry, defense, overrides: dict[str, dict[str, str]]) -> dict:
    """The configured data detectors ``defense`` runs (``uses_detectors``), an input detector refused."""
    detectors = {n: registry.detector(n).from_overrides(overrides.get(n, {}))
                 for n in (defense.uses_detectors if defense else ())}
    for name, detector in detectors.items():
        if detector.level != "data":
            raise HandoverError(f"{defense.name} runs {name}, which screens inputs: give a data detector")
    return detectors
