"""The stage of a training-time defense: the defense trains a model of the cell's architecture on the
poisoned training set (never told which rows are poisoned) through the core loop, with what
:class:`~nadbench.contract.api.TrainingContext` gives it: the profile's schedule, a fresh model
seeded as plain training's, the plainly trained model, and the data detectors it names. Its model is
stored under its own key (this module's code closure, the defense's and its detectors' configs and
code, the poisoning, the run's settings); the cell then measures it as it measures a repair."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ...contract.api import DatasetSpec, Detection, Defended, DetectionContext, Split, TrainingContext
from ...contract.config import PluginError
from ...training.attention import layer_names
from ...training.models import build, classifier_name
from ..defending import apply_training_defense
from ..detecting import FPR, inspect_data
from .train import initial


def context(registry, dataset: DatasetSpec, *, arch: str, seed: int, device: torch.device, schedule,
            plain_model: Callable[[], torch.nn.Module], detect: Callable[[str], Detection],
            log_metric: Callable, log_figure: Callable, progress: bool = True) -> TrainingContext:
    """What a training-time defense may reach, in a grid cell and in `bench train` alike."""
    spec = registry.model(arch)
    built = build(spec, dataset)
    return TrainingContext(device=device, num_classes=dataset.num_classes, arch=arch, seed=seed, schedule=schedule,
                           layers=layer_names(built, spec.attention_layers),
                           classifier_layer=classifier_name(built, spec),
                           build_model=lambda: initial(spec, dataset, seed, device), plain_model=plain_model, detect=detect, log_metric=log_metric,
                           log_figure=log_figure, progress=progress)


def detectors_for(defense, detectors: dict, data: Split, clean: Split, plain_model: Callable[[], torch.nn.Module],
                  dctx: DetectionContext, fpr: float = FPR) -> Callable[[str], Detection]:
    """``ctx.detect``: each configured data detector of ``detectors`` (the defense's ``uses_detectors``)
    over ``data`` as a detection cell runs it (the clean share mixed in; the engine's decision at
    ``fpr`` where it makes none), given the plainly trained model when it reads one."""
    def detect(name: str) -> Detection:
        if name not in detectors:
            raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: it called "
                              f"ctx.detect({name!r}), and names {', '.join(map(repr, detectors)) or 'none'} in "
                              "uses_detectors (what its stored model is keyed by)")
        detector = detectors[name]
        got = inspect_data(detector, data, clean, plain_model() if detector.uses_model else None, dctx, fpr)
        return Detection(got.scores, got.flagged)
    return detect


def trained(defense, data: Split, clean: Split, ctx: TrainingContext) -> tuple[Defended, float]:
    """(what the defense trained, its seconds): the defense on the poisoned set ``data``."""
    return apply_training_defense(defense, data, clean, ctx)


LOGGED = "defense/logged/"


def stored(defense, data: Split, clean: Split, ctx: TrainingContext) -> dict[str, torch.Tensor]:
    """What the stage stores: the model the defense trains on ``data`` (:func:`trained`), its seconds
    (``defense/seconds``) and each number it logged without a step (``defense/logged/NAME``: the rows
    it dropped or isolated), so that a stored model reports what the fresh one did (:func:`logged`)."""
    summary: dict[str, float] = {}

    def log_metric(name, value, step=None):
        if step is None:
            summary[name] = float(value)
        ctx.log_metric(name, value, step)
    defended, seconds = trained(defense, data, clean, dataclasses.replace(ctx, log_metric=log_metric))
    return {**{k: v.detach().clone() for k, v in defended.model.state_dict().items()},
            "defense/seconds": torch.tensor(seconds), **{LOGGED + k: torch.tensor(v) for k, v in summary.items()}}


def logged(entry: dict[str, torch.Tensor]) -> dict[str, float]:
    """The numbers the defense of a stored entry logged without a step (see :func:`stored`)."""
    return {k[len(LOGGED):]: float(v) for k, v in entry.items() if k.startswith(LOGGED)}
