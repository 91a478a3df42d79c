"""The train stage for a group of models trained fused (``bench run --fused``, :mod:`nadbench.training.fused`):
the same initialisation and schedule as :mod:`nadbench.engine.stages.train`, one stacked model per step. Its
code is in the train keys of a fused run only: the others stay as they are when the fused trainer
changes."""
from __future__ import annotations

import torch

from ...contract.api import DatasetSpec, ModelSpec, Split
from ...training.fused import train_fused
from ...training.train import Optim
from .train import initial


def trained_together(model: ModelSpec, dataset: DatasetSpec, datas: list[Split], seeds: list[int], optim: Optim,
                     device: torch.device, desc: str = "train fused",
                     progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """The state dicts of models of ``model`` trained on ``datas[i]`` from ``seeds[i]`` with ``optim``
    (the group's :func:`~nadbench.engine.stages.train.schedule`), each as
    :func:`nadbench.engine.stages.train.trained` would train it with a plain step."""
    models = [initial(model, dataset, seed, device) for seed in seeds]
    train_fused(models, datas, optim, seeds=seeds, desc=desc, progress=progress)
    return [m.state_dict() for m in models]
