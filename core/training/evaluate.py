"""The one evaluation: predictions, ACC, ASR, RA and DER, as every grid cell, `bench defend` and the tests
measure them. A module of its own (not part of ``train``), so that stage keys can tell an edit to
the evaluation (cells are evaluated again) from an edit to the training loop (models are retrained).
"""
from __future__ import annotations

import torch
from torch import nn

from ..contract.api import Split
from .augment import to_float
from .train import _autocast, channels_last, precision


def predict(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, in eval mode, in large batches (memory is no concern
    without gradients: 1000 images of 32x32 on a CPU, 5000 on a GPU), channels-last on the CPU as
    the plain training phases (its convolutions are faster there)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or (5000 if device.type == "cuda" else 1000)
    bf16 = precision(device) == "bf16"
    fmt = torch.channels_last if channels_last(device) else torch.contiguous_format
    model.to(memory_format=fmt)  # outside inference mode: the weights stay trainable
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            with _autocast(device, bf16):
                out.append(model(to_float(images[i:i + batch_size].to(device)).contiguous(memory_format=fmt)).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


def accuracy(model: nn.Module, split: Split) -> float:
    """Share of ``split`` classified correctly."""
    preds = predict(model, split.images)
    return float((preds == split.labels.to(preds.device)).float().mean())


def _check_targets(triggered: Split, targets: int | torch.Tensor) -> torch.Tensor:
    targets = torch.as_tensor(targets, device=triggered.labels.device).expand(len(triggered))
    if bool((triggered.labels == targets).any()):
        raise ValueError("the ASR set must not contain images whose target is their own label")
    return targets


def backdoor_metrics(model: nn.Module, triggered: Split, targets: int | torch.Tensor) -> dict[str, float]:
    """On the triggered images (none of which has its target as its true label; ``Attack.trigger_test``
    builds them so), with one pass of predictions: ``asr``, the share classified as their target
    (one label, all-to-one, or one per image, all-to-all), and ``ra``, BackdoorBench's robust
    accuracy, the share classified as their *true* label. A defense that turns triggered images
    into garbage has a low ASR and a low RA; one that repairs the model has a high RA."""
    targets = _check_targets(triggered, targets)
    preds = predict(model, triggered.images)
    return {"asr": float((preds == targets.to(preds.device)).float().mean()),
            "ra": float((preds == triggered.labels.to(preds.device)).float().mean())}


def attack_success_rate(model: nn.Module, triggered: Split, targets: int | torch.Tensor) -> float:
    """Share of triggered images classified as their target (see :func:`backdoor_metrics`)."""
    return backdoor_metrics(model, triggered, targets)["asr"]


def defense_effectiveness(before: dict[str, float], after: dict[str, float]) -> float:
    """BackdoorBench's defense effectiveness rating, DER = [max(0, dASR) - max(0, dACC) + 1] / 2 with
    d = before - after as fractions: in [0, 1], 1 for a defense that removes a 100 % backdoor at no
    accuracy cost, 0.5 for one that changes nothing (Wu et al., BackdoorBench, NeurIPS 2022)."""
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["acc"] - after["acc"]) + 1) / 2


def attack_evaluations(model: nn.Module, sets: dict[str, tuple[Split, torch.Tensor]]) -> dict[str, float]:
    """An attack's own evaluations of its trigger (``Attack.evaluations``): for each named set of
    triggered images and their targets, the share classified as their target, measured as ASR is,
    as ``attack.<name>``."""
    return {f"attack.{name}": attack_success_rate(model, split, targets) for name, (split, targets) in sets.items()}


def evaluate(model: nn.Module, test: Split, triggered: Split, targets: int | torch.Tensor,
             extra: dict[str, tuple[Split, torch.Tensor]] | None = None) -> dict[str, float]:
    """The engine's evaluation of every cell: ACC on the whole clean test set, ASR and RA, and the
    attack's own evaluations ``extra`` (:func:`attack_evaluations`)."""
    return {"acc": accuracy(model, test), **backdoor_metrics(model, triggered, targets),
            **attack_evaluations(model, extra or {})}
