"""Training steps for attacks that control training (``Attack.train_step``) and for defenses,
built on the loop's one extension point (:class:`nadbench.training.train.Step`)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .train import Step, scalar_loss


class LabelKeepingSamples(Step):
    """Per batch, replace a share of the images that are not poisoned by a transformed version that
    keeps its label: WaNet's noise-mode samples, BppAttack's negatives. They teach the model that
    only the exact trigger flips the label, not anything like it.

    ``transform(x, generator)`` takes float [0, 1] images (N, C, H, W) and returns them transformed;
    ``share`` is the fraction of each batch so replaced (rounded down, as the official code does);
    ``poisoned``: the indices of the poisoned training images, which are never chosen.
    """

    def __init__(self, share: float, transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                 poisoned: torch.Tensor, n_train: int):
        self.share, self.transform = share, transform
        self.clean = torch.ones(n_train, dtype=torch.bool, device=poisoned.device)
        self.clean[poisoned] = False

    def batch(self, x, y, index, generator):
        count = int(len(y) * self.share)
        candidates = self.clean.to(index.device)[index].nonzero().flatten()
        if count == 0 or len(candidates) == 0:
            return x, y
        pick = candidates[torch.randperm(len(candidates), device=candidates.device, generator=generator)[:count]]
        x = x.clone()
        x[pick] = self.transform(x[pick], generator).clamp(0, 1)
        return x, y


class TriggerAfterAugmentation(Step):
    """Put the trigger on each batch's poisoned rows *after* augmentation, where a test image has
    it: for a trigger that a random crop or flip would move out of alignment (a DCT coefficient's
    phase) when the official code trains without augmentation. The stored poisoned rows then carry
    only their new labels. ``trigger(x)`` takes and returns float [0, 1] images (N, C, H, W)."""

    def __init__(self, trigger: Callable[[torch.Tensor], torch.Tensor], poisoned: torch.Tensor, n_train: int):
        self.trigger = trigger
        self.rows = torch.zeros(n_train, dtype=torch.bool, device=poisoned.device)
        self.rows[poisoned] = True
        self.mine = None

    def batch(self, x, y, index, generator):
        self.mine = self.rows[index.to(self.rows.device)]
        return x, y

    def update(self, model, x, y, optimizer):
        if bool(self.mine.any()):
            x = x.clone()
            x[self.mine] = self.trigger(x[self.mine]).clamp(0, 1)
        return super().update(model, x, y, optimizer)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Batch norms in training mode that leave their running statistics alone (momentum 0): for a
    forward pass whose batch must not enter them (SAM's second pass, a step's extra samples)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class SAMStep(Step):
    """Sharpness-aware minimisation (Foret et al., ICLR 2021), by default in its adaptive form
    (ASAM, Kwon et al., ICML 2021): each step takes two forward-backward passes. The first gives
    the gradient g; the weights move to w + e with ``e = rho * T^2 g / ||T g||`` (T = |w| when
    ``adaptive``, else 1), the second pass takes the gradient there, and the optimiser applies it
    at w. The second pass leaves batch-norm running statistics alone (they are the first pass's).
    ``label_smoothing``: of the cross-entropy. ``passes`` counts forward-backward passes."""

    def __init__(self, rho: float, adaptive: bool = True, label_smoothing: float = 0.0):
        self.rho, self.adaptive, self.label_smoothing = rho, adaptive, label_smoothing
        self.passes = 0

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def _pass(self, model, x, y, optimizer) -> torch.Tensor:
        with self.autocast():
            loss = scalar_loss(self, self.loss(model, x, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.passes += 1
        return loss.detach()

    def update(self, model, x, y, optimizer):
        loss = self._pass(model, x, y, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            scaled = [(p.abs() * p.grad if self.adaptive else p.grad) for p in params]
            scale = self.rho / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
                                + 1e-12)
            shifts = [(p.abs() * g if self.adaptive else g) * scale for p, g in zip(params, scaled)]
            torch._foreach_add_(params, shifts)
        with frozen_bn_stats(model):
            self._pass(model, x, y, optimizer)
        with torch.no_grad():
            torch._foreach_sub_(params, shifts)
        optimizer.step()
        return loss
