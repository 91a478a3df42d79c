"""The poison stage: an attack prepared and run on a dataset's training and test splits, with what it
may reach (:class:`~nadbench.contract.api.AttackContext`: the dataset, the device, the seed, the clean model of
the student architecture when it declares ``uses_clean_model``, other datasets)."""
from __future__ import annotations

from typing import Callable

import torch

from ...contract.api import AttackContext, DatasetSpec, Split
from ...contract.config import PluginError
from ..poisoning import Poisoning, craft


def poison(key: str, attack, dataset: DatasetSpec, train_set: Split, test_set: Split, *, seed: int,
           device: torch.device, clean_model: Callable[[], torch.nn.Module], load_dataset: Callable,
           progress: bool = True) -> tuple[Poisoning, dict[str, torch.Tensor]]:
    """The poisoning of ``key`` and the tensors to store (see :func:`nadbench.engine.poisoning.craft`).
    ``clean_model()`` trains or loads the clean model, called only by an attack that declares it uses one."""
    def clean():
        if not attack.uses_clean_model:
            raise PluginError(f"attack {attack.name!r} ({attack.provider}) calls ctx.clean_model() but does not "
                              "declare uses_clean_model = True (its poisoning depends on that model, so the "
                              "engine must key the stored poisoning by it)")
        return clean_model()

    ctx = AttackContext(dataset=dataset, train=train_set, device=device, seed=seed, clean_model=clean,
                        load_dataset=load_dataset, progress=progress)
    return craft(key, attack, ctx, train_set, test_set, seed)
