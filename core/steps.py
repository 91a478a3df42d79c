"""Training steps for attacks that control training (``Attack.train_step``), built on the loop's
one extension point (:class:`nadbench.train.Step`)."""
from __future__ import annotations

from typing import Callable

import torch

from .train import Step


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
