"""The one evaluation: predictions, ACC and ASR, as every grid cell, `bench defend` and the tests
measure them. A module of its own (not part of ``train``), so that stage keys can tell an edit to
the evaluation (cells are evaluated again) from an edit to the training loop (models are retrained).
"""
from __future__ import annotations

import torch
from torch import nn

from .api import Split
from .augment import to_float
from .train import _autocast, precision


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, in eval mode, in large batches (memory is no concern
    without gradients: 1000 images of 32x32 on a CPU, 5000 on a GPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or (5000 if device.type == "cuda" else 1000)
    bf16 = precision(device) == "bf16"
    out = []
    for i in range(0, len(images), batch_size):
        with _autocast(device, bf16):
            out.append(model(to_float(images[i:i + batch_size].to(device))).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


def accuracy(model: nn.Module, split: Split) -> float:
    """Share of ``split`` classified correctly."""
    preds = predict(model, split.images)
    return float((preds == split.labels.to(preds.device)).float().mean())


def attack_success_rate(model: nn.Module, triggered: Split, targets: int | torch.Tensor) -> float:
    """Share of triggered images classified as their target: one label (all-to-one) or one per
    image (all-to-all). No image of ``triggered`` may have its target as its true label
    (``Attack.trigger_test`` builds it so)."""
    targets = torch.as_tensor(targets, device=triggered.labels.device).expand(len(triggered))
    if bool((triggered.labels == targets).any()):
        raise ValueError("the ASR set must not contain images whose target is their own label")
    preds = predict(model, triggered.images)
    return float((preds == targets.to(preds.device)).float().mean())


def evaluate(model: nn.Module, test: Split, triggered: Split, targets: int | torch.Tensor) -> dict[str, float]:
    """The engine's evaluation of every cell: ACC on the whole clean test set, and ASR."""
    return {"acc": accuracy(model, test), "asr": attack_success_rate(model, triggered, targets)}
