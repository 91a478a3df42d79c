"""What a model computes for a set of images, in batches without gradients: logits, probabilities,
the penultimate features (the inputs of the classifier layer) and any layer's output. The detectors
read models through these, so that every one batches, converts and hooks alike."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..training.augment import to_float

BATCH = 500


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batched(model: nn.Module, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
            batch_size: int = BATCH) -> torch.Tensor:
    """``fn`` (float [0, 1] batch -> tensor) over uint8 ``images`` in eval mode and inference mode,
    concatenated on the model's device; the model's train/eval mode is put back after."""
    was_training, device = model.training, _device(model)
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                out.append(fn(to_float(images[i:i + batch_size].to(device))).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)


def logits(model: nn.Module, images: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """(N, classes) logits of uint8 images."""
    return batched(model, images, model, batch_size)


def probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """(N, classes) softmax outputs of uint8 images."""
    return batched(model, images, lambda x: model(x).softmax(1), batch_size)


def layer_output(model: nn.Module, images: torch.Tensor, layer: str, *, inputs: bool = False,
                 batch_size: int = BATCH) -> torch.Tensor:
    """(N, ...) output of the module ``layer`` (dotted name) for uint8 images; with ``inputs``, its
    (first) input instead."""
    module = model.get_submodule(layer)
    seen: list[torch.Tensor] = []

    def hook(_module, args, output):
        seen.append((args[0] if inputs else output).detach())

    handle = module.register_forward_hook(hook)
    try:
        def run(x):
            seen.clear()
            model(x)
            return seen[0]
        return batched(model, images, run, batch_size)
    finally:
        handle.remove()


def penultimate(model: nn.Module, images: torch.Tensor, classifier_layer: str,
                batch_size: int = BATCH) -> torch.Tensor:
    """(N, D) penultimate features: the inputs of the final linear layer ``classifier_layer``
    (``DetectionContext.classifier_layer``), flattened."""
    if not classifier_layer:
        raise ValueError("the model declares no classifier layer (ModelSpec.classifier_layer): its penultimate "
                         "features cannot be read")
    return layer_output(model, images, classifier_layer, inputs=True, batch_size=batch_size).flatten(1)


def as_rows(features: torch.Tensor) -> torch.Tensor:
    """(N, ...) features as a float64 (N, D) matrix on the CPU, for statistics that need the precision."""
    return features.detach().flatten(1).to("cpu", torch.float64)


def by_class(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """{label: the indices of its rows}, for the labels present, in label order."""
    return {int(c): (labels == c).nonzero().flatten() for c in labels.unique().tolist()}
