"""FT-SAM (Zhu et al., ICCV 2023, "Enhancing Fine-Tuning Based Backdoor Defense with
Sharpness-Aware Minimization"): finetune on the clean subset with adaptive sharpness-aware
minimisation, which moves the weights out of the sharp region the backdoor neurons sit in.

Settings of BackdoorBench's ``config/defense/ft-sam/cifar10.yaml`` (read for settings only): ASAM
with rho 2.0, label smoothing 0.1, SGD momentum 0.9 (no Nesterov), weight decay 5e-4, batch 256,
lr 0.01 with a cosine decay over 100 epochs, random crop (4 px) and flip. Its lr is kept in every
profile (the quick profile's lower finetuning lr is for the lr-0.1 finetuning defenses); ``quick``
runs 20 epochs instead of 100 to keep a cell short on a CPU (``time_defense_s`` in
``benchmarks/results/table1-quick-paper-attacks-new-defenses.json``; ``paper`` keeps 100).
The two-pass step is core's ``SAMStep`` on the one training loop.
"""
from dataclasses import dataclass

from nadbench import Defense, Deviation, Source, hookimpl, param
from nadbench.training.steps import SAMStep
from nadbench.training.train import Optim, train


@dataclass(frozen=True)
class FTSAMConfig:
    epochs: int = param(100, "finetuning epochs (cosine learning-rate decay)", min=1, max=1000)
    lr: float = param(0.01, "initial learning rate", min=0.0, max=10.0)
    batch_size: int = param(256, "batch size", min=1, max=65536)
    weight_decay: float = param(5e-4, "SGD weight decay", min=0.0, max=1.0)
    rho: float = param(2.0, "neighbourhood radius of the sharpness-aware step", min=0.0)
    adaptive: bool = param(True, "adaptive SAM (ASAM): the neighbourhood scaled by |w|")
    label_smoothing: float = param(0.1, "label smoothing of the cross-entropy", min=0.0, max=1.0)


class FTSAM(Defense):
    name = "ft-sam"
    Config = FTSAMConfig
    description = "finetuning with adaptive sharpness-aware minimisation (two passes per step)"
    sources = (Source(paper="Zhu, Wei, Shen, Fan & Wu, "
                            "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization, "
                            "ICCV 2023",
                      repo="SCLBD/BackdoorBench", path="defense/ft-sam.py",
                      commit="f02e3534645f0ee63d6848653062cd6c0d6c400d",
                      backdoorbench="config/defense/ft-sam/cifar10.yaml"),)
    deviations = (Deviation("epochs", ours="100 (paper profile), 20 on quick", theirs="100", bb="100",
                            why="a cell short enough for a CPU"),)
    profile_settings = {"epochs": {"quick": 20}}

    def defend(self, model, clean, ctx):
        cfg = self.config
        optim = Optim(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.9, nesterov=False,
                      weight_decay=cfg.weight_decay, schedule="cosine", crop=4, flip=True)
        step = SAMStep(cfg.rho, cfg.adaptive, cfg.label_smoothing)
        return train(model, clean, optim, seed=ctx.seed, step=step, desc="ft-sam", progress=ctx.progress,
                     on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(FTSAM)
