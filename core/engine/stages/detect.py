"""The detect stage of a detection cell: a data detector on the cell's poisoned training set (the
defender's clean share beside it), or an input detector on the cell's backdoored model, shown clean
test images and the ASR set's triggered ones shuffled together; then the one set of detection
metrics against the truth, which the detector never sees. A cell's recorded result is keyed by this
module's code closure (with the detector plugin's)."""
from __future__ import annotations

from typing import Callable

import torch

from ...contract.api import DatasetSpec, DetectionContext, Split
from ...training.attention import layer_names
from ...training.models import build, classifier_name
from ...training.subsets import clean_subset, limit
from ..detecting import Detected, detection_metrics, inspect_data, screen_inputs
from ..poisoning import Poisoning, seeded


def context(registry, dataset: DatasetSpec, *, arch: str, seed: int, device: torch.device, log_metric: Callable,
            log_figure: Callable, progress: bool = True) -> DetectionContext:
    """What a detector may reach, in a grid cell and in ``bench detect`` alike: the architecture, its
    layers, a model builder, device, seed, logging; nothing that loads data."""
    spec = registry.model(arch) if arch else None
    built = build(spec, dataset) if spec else None
    return DetectionContext(
        device=device, num_classes=dataset.num_classes, seed=seed, arch=arch,
        layers=layer_names(built, spec.attention_layers) if spec else (),
        classifier_layer=classifier_name(built, spec) if spec else "",
        build_model=lambda name: build(registry.model(name), dataset, device), log_metric=log_metric,
        log_figure=log_figure, progress=progress)


def inputs(test_set: Split, triggered: Split, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What an input detector is shown: seeded ``n`` of the clean test images and ``n`` of the
    triggered ones (None: all of each), shuffled together; returns (uint8 images, triggered?)."""
    clean, trig = limit(test_set, n, seed), limit(triggered, n, seed)
    truth = torch.cat([torch.zeros(len(clean), dtype=torch.bool), torch.ones(len(trig), dtype=torch.bool)])
    order = torch.randperm(len(truth), generator=seeded(seed, "detect-inputs"))
    images = torch.cat([clean.images, trig.images.to(clean.images.device)])
    return images[order.to(images.device)], truth[order]


def detect(detector, p: Poisoning, model: torch.nn.Module | None, train_set: Split, test_set: Split, share: float,
           seed: int, ctx: DetectionContext, fpr: float, n_inputs: int | None) -> tuple[Detected, torch.Tensor, dict]:
    """A detection cell's stage: the detector at its level, with the defender's clean share of
    ``train_set`` (nested over shares as a defense's); returns (what it detected, the truth, the metrics)."""
    clean = clean_subset(train_set, share, seed)
    if detector.level == "data":
        truth = torch.zeros(len(p.poisoned), dtype=torch.bool)
        truth[p.index.cpu()] = True
        detected = inspect_data(detector, p.poisoned, clean, model, ctx, fpr)
    else:
        images, truth = inputs(test_set, p.triggered, n_inputs, seed)
        detected = screen_inputs(detector, model, clean, images, ctx, fpr)
    return detected, truth, detection_metrics(detected.scores, truth, detected.flagged, fpr)
