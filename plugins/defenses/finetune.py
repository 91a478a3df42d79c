"""Standard finetuning: train the backdoored model on the defender's clean subset.

The settings are the official NAD code's (NAD with every beta = 0): SGD with Nesterov momentum,
lr 0.1 dropping to 0.01 after 2 epochs, crop + flip + cutout, 10 epochs.
"""
from dataclasses import dataclass

from nadbench import Defense, Deviation, Source, hookimpl
from nadbench.training.train import FinetuneParams, train


@dataclass(frozen=True)
class FinetuneConfig(FinetuneParams):
    pass


class Finetune(Defense):
    name = "finetune"
    Config = FinetuneConfig
    description = "finetune all layers on the clean subset"
    sources = (Source(paper="Li, Lyu, Koren, Lyu, Li & Ma, "
                            "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, "
                            "ICLR 2021",
                      repo="bboylyg/NAD", path="main.py", commit="f17b71390f61fe24335728bfea53e4fe86ee450b",
                      backdoorbench="config/defense/ft/cifar10.yaml"),)
    deviations = (Deviation("schedule",
                            ours="SGD Nesterov, lr 0.1 then 0.01 after 2 epochs, 10 epochs, crop+flip+cutout",
                            theirs="the same (NAD with every beta 0)", bb="SGD lr 0.01 cosine, 100 epochs, wd 5e-4",
                            why="the NAD paper's baseline"),)
    # The quick profile's 10-epoch models take a lower finetuning lr (core/engine/grid.py).
    profile_settings = {"lr": "finetune_lr"}

    def defend(self, model, clean, ctx):
        return train(model, clean, self.config.optim(), seed=ctx.seed, desc="finetune",
                     progress=ctx.progress,
                     on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(Finetune)
