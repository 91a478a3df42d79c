"""Input perturbations for the input-level detectors: superimposing images (STRIP), amplifying pixel
values (SCALE-UP), a seeded draw of the rows to perturb with, and the Shannon entropy of predictions.

Everything works on float [0, 1] batches (the models normalise inside); :func:`overlay_entropy` and
:func:`scaled_labels` take uint8 images and run the model through ``features.batched`` (eval mode,
no gradients, the model's device). Each input's result depends on that input alone, never on the
rest of its batch: the perturbations are fixed by the caller, not drawn here per batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .features import BATCH, batched


def draw(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` row indices out of ``n``, seeded: distinct where ``k <= n``, else drawn with replacement
    (as STRIP's authors draw their overlays), so that a small pool still gives ``k`` rows."""
    if n < 1:
        raise ValueError("nothing to draw from: the pool is empty")
    g = torch.Generator().manual_seed(seed)
    if k <= n:
        return torch.randperm(n, generator=g)[:k]
    return torch.randint(n, (k,), generator=g)


def superimpose(images: torch.Tensor, overlay: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``images + weight * overlay`` (float; ``overlay`` broadcasts over the batch), not clipped: STRIP's
    authors add the two images (``cv2.addWeighted(x, 1, overlay, 1, 0)`` on float images) and feed
    the sum, in [0, 1 + weight], to the model."""
    return images + weight * overlay


def amplify(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Pixel values multiplied by ``factor`` and clipped to [0, 1] (SCALE-UP's amplified image)."""
    return (images * factor).clamp(0.0, 1.0)


def entropy(logits: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """(N,) Shannon entropy of the softmax of (N, classes) ``logits``, in bits by default; a zero
    probability contributes zero (``entr``), never NaN."""
    return torch.special.entr(logits.float().softmax(1)).sum(1) / math.log(base)


def overlay_entropy(model: nn.Module, images: torch.Tensor, overlays: torch.Tensor, weight: float = 1.0,
                    batch_size: int = BATCH) -> torch.Tensor:
    """(N,) mean prediction entropy of each uint8 image superimposed with every one of ``overlays``
    (float [0, 1], (K, C, H, W), on the model's device): K forwards per image, one overlay at a time
    so that memory stays that of one batch."""
    def mean_entropy(x):
        total = torch.zeros(len(x), device=x.device)
        for overlay in overlays:
            total += entropy(model(superimpose(x, overlay, weight)))
        return total / len(overlays)
    return batched(model, images, mean_entropy, batch_size)


def scaled_labels(model: nn.Module, images: torch.Tensor, factors, batch_size: int = BATCH) -> torch.Tensor:
    """(N, len(factors)) predicted labels of each uint8 image amplified by each factor (a factor of 1
    is the image itself); a factor listed twice is computed once."""
    def labels(x):
        seen = {}
        for f in factors:
            if f not in seen:
                seen[f] = model(amplify(x, f)).argmax(1)
        return torch.stack([seen[f] for f in factors], 1)
    return batched(model, images, labels, batch_size).long()
