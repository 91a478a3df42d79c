"""The reactivation check (Min et al., NeurIPS 2024, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense"): does a repaired model regain its backdoor after a little
finetuning on a few poisoned samples (their *retuning attack*), faster than a clean model learns it
from the same samples? A low ASR after a defense can be a mask, not a repair.

The evaluator's, run by the engine after the defense (``bench run --reactivation``); the defense
never sees its data. At the authors' settings (AISafety-HKUST/stable_backdoor_purification,
``fine_tune/ft_poison.py``): 1,000 training images (2 % of CIFAR-10), 5 of them poisoned rows of the
cell's poisoning with their poisoned labels; 5 epochs of SGD, lr 0.01, momentum 0.9, no weight
decay, batch 128. Deviation: the authors augment the clean images (crop, flip) and not the poisoned
ones; here every image is augmented alike, as the profile trained the backdoored model. An attack
that controls training retunes with its own step, as the engine trains with it.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..contract.api import Split
from ..training.train import Optim, train

RETUNE = Optim(epochs=5, lr=0.01, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="step")
SIZE, POISONED = 1000, 5


def retuning_set(poisoned: Split, rows: torch.Tensor, seed: int, size: int = SIZE,
                 n_poisoned: int = POISONED) -> tuple[Split, torch.Tensor]:
    """(``size`` images of the poisoned training set: ``n_poisoned`` of its poisoned ``rows`` and the
    rest drawn from its clean rows, seeded; the positions of the poisoned ones in it)."""
    gen = torch.Generator().manual_seed(seed)
    device = poisoned.labels.device
    is_poisoned = torch.zeros(len(poisoned), dtype=torch.bool, device=device)
    is_poisoned[rows] = True
    clean_rows = (~is_poisoned).nonzero().flatten().cpu()
    rows = rows.cpu()
    take = rows[torch.randperm(len(rows), generator=gen)[:n_poisoned]]
    rest = clean_rows[torch.randperm(len(clean_rows), generator=gen)[:size - len(take)]]
    chosen = torch.cat([take, rest]).to(device)
    return poisoned.subset(chosen), torch.arange(len(take), device=device)


def retune(model: nn.Module, data: Split, positions: torch.Tensor, attack, seed: int, crop: int = 0,
           flip: bool = False, progress: bool = False) -> nn.Module:
    """A retuned copy of ``model`` (the original is left alone), augmented with ``crop`` and ``flip``
    (the engine passes its profile's, as the model was trained), with ``attack``'s training step when
    it controls training (a copy of the attack: what it learnt stays as it was)."""
    step = copy.deepcopy(attack).train_step(positions, len(data)) if attack is not None else None
    optim = dataclasses.replace(RETUNE, crop=crop, flip=flip)
    return train(copy.deepcopy(model), data, optim, seed=seed, step=step, desc="retuning", progress=progress)
