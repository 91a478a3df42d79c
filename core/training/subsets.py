"""Seeded subsets of a split: the quick runs' limits and the defender's clean data. Kept apart from
the data loaders so that the stages that select subsets are keyed by this code alone."""
from __future__ import annotations

import torch

from ..contract.api import Split


def _random_subset(split: Split, n: int, seed: int) -> Split:
    """n images drawn with a private generator (independent of the global RNG), kept in their
    original order."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:n].sort().values
    return split.subset(index.to(split.labels.device))


def clean_subset(train: Split, share: float, seed: int) -> Split:
    """The defender's clean data: a seeded random ``share`` (e.g. 0.05) of the training set."""
    if not 0 < share <= 1:
        raise ValueError(f"clean data share must be in (0, 1], got {share}")
    return _random_subset(train, max(1, round(share * len(train))), seed)


def limit(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset of ``n`` images (None or n >= len: the whole split), for quick runs."""
    if n is None or n >= len(split):
        return split
    if n < 0:
        raise ValueError(f"limit must be >= 0, got {n}")
    return _random_subset(split, n, seed)
