"""Standard finetuning: train the backdoored model on the defender's clean subset.

The settings are the official NAD code's (NAD with every beta = 0): SGD with Nesterov momentum,
lr 0.1 dropping to 0.01 after 2 epochs, crop + flip + cutout, 10 epochs.
"""
from dataclasses import dataclass

from nadbench import Defense, hookimpl
from nadbench.train import FinetuneParams, train


@dataclass(frozen=True)
class FinetuneConfig(FinetuneParams):
    pass


class Finetune(Defense):
    name = "finetune"
    Config = FinetuneConfig
    description = "finetune all layers on the clean subset"
    # The quick profile's 10-epoch models take a lower finetuning lr (core/grid.py).
    profile_settings = {"lr": "finetune_lr"}

    def defend(self, model, clean, ctx):
        return train(model, clean, self.config.optim(), seed=ctx.seed, desc="finetune",
                     progress=ctx.progress,
                     on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(Finetune)
