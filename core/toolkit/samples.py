"""Per-row views of a training set, for training-time defenses: each row's loss under a model (no
augmentation, in batches, as ABL's isolation ranks its rows) and a set split by a decision or by the
rows' ranks (the share with the lowest or highest scores)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.api import Split
from .features import BATCH, logits


def losses(model: nn.Module, data: Split, batch_size: int = BATCH) -> torch.Tensor:
    """Each row's cross-entropy under ``model`` (eval mode, no augmentation), float32 on the CPU."""
    out = logits(model, data.images, batch_size)
    return F.cross_entropy(out, data.labels.to(out.device), reduction="none").cpu()


def ranked_share(scores: torch.Tensor, share: float, *, highest: bool) -> torch.Tensor:
    """A bool mask of the ``share`` of rows with the highest (or lowest) scores: at least one row while
    ``share`` > 0; ties broken by position, so that the mask is the same on every machine."""
    n = round(share * len(scores)) if share > 0 else 0
    n = max(n, 1) if share > 0 and len(scores) else n
    order = torch.sort(scores.cpu().double(), descending=highest, stable=True).indices
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:n]] = True
    return mask


def split(data: Split, drop: torch.Tensor) -> tuple[Split, Split]:
    """(the rows ``drop`` leaves, the rows it takes), each in the set's order."""
    drop = drop.to(data.labels.device)
    return data.subset((~drop).nonzero().flatten()), data.subset(drop.nonzero().flatten())
