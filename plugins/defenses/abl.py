"""Anti-Backdoor Learning (ABL; Li, Lyu, Koren, Lyu, Li & Ma, NeurIPS 2021): a training-time defense.

Poisoned rows are learnt faster than clean ones. ABL trains a fresh model with local gradient ascent
(LGA): where the batch's loss falls below ``gamma`` its gradient is reversed, so the model holds the
clean rows near ``gamma`` while the poisoned ones, learnt fast, fall far below it. The ``isolation``
share with the lowest per-row loss (no augmentation) is isolated; the model is then finetuned on the
rest, and unlearns the isolated rows by gradient ascent on their loss.

Every phase runs the core loop (``nadbench.training.train.train``) with a ``Step``: the objectives are
the two lines of ``LGA`` and ``Ascent``. The authors' settings are the defaults (bboylyg/ABL: WRN-16-1,
SGD lr 0.1 for the isolation, 60 epochs of finetuning with crop, flip and cutout, 5 unlearning epochs
of which the first only evaluates, at lr 5e-4); ``abl@bb`` is BackdoorBench's configuration.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nadbench import Deviation, Source, TrainingDefense, hookimpl, param
from nadbench.toolkit.samples import losses, ranked_share, split
from nadbench.training.train import Optim, Step, train


@dataclass(frozen=True)
class ABLConfig:
    loss: str = param("lga", "the isolation objective: lga (the paper's) or flooding, |loss - gamma| + gamma "
                             "(the code's default)", choices=("lga", "flooding"))
    gamma: float = param(0.5, "the loss below which the isolation ascends", min=0.0)
    isolation: float = param(0.01, "the share of rows isolated (lowest loss after the isolation)",
                             min=0.0, max=0.5, min_exclusive=True)
    tuning_epochs: int = param(10, "isolation epochs (no augmentation, constant lr)", min=1, max=1000)
    lr: float = param(0.1, "the isolation's learning rate", min=0.0, max=10.0)
    finetuning_epochs: int = param(60, "epochs of finetuning on the rows not isolated (0: none)", min=0, max=1000)
    finetuning_lr: float = param(0.1, "the finetuning's initial learning rate", min=0.0, max=10.0)
    milestones: tuple[int, ...] = param((40,), "finetuning epochs at which its lr drops 10x", min=0)
    crop: int = param(4, "the finetuning's random-crop padding (0: off)", min=0, max=16)
    flip: bool = param(True, "the finetuning's random horizontal flips")
    cutout: int = param(3, "the finetuning's cutout square (0: off)", min=0, max=32)
    unlearning_epochs: int = param(4, "epochs of gradient ascent on the isolated rows", min=0, max=1000)
    unlearning_lr: float = param(5e-4, "the unlearning's learning rate (constant)", min=0.0, max=10.0)
    batch_size: int = param(128, "batch size of every phase", min=1, max=65536)
    weight_decay: float = param(1e-4, "SGD weight decay", min=0.0, max=1.0)


class LGA(Step):
    """Local gradient ascent: the batch's cross-entropy, its sign reversed below ``gamma``; or flooding."""

    def __init__(self, gamma: float, flooding: bool):
        self.gamma, self.flooding = gamma, flooding

    def loss(self, model, x, y):
        loss = F.cross_entropy(model(x), y)
        return (loss - self.gamma).abs() + self.gamma if self.flooding else torch.sign(loss - self.gamma) * loss


class Ascent(Step):
    """Unlearning: gradient ascent on the cross-entropy of the isolated rows."""

    def loss(self, model, x, y):
        return -F.cross_entropy(model(x), y)


class ABL(TrainingDefense):
    name = "abl"
    Config = ABLConfig
    description = "isolate the rows learnt fastest (LGA), finetune on the rest, unlearn the isolated"
    sources = (Source(paper="Li, Lyu, Koren, Lyu, Li & Ma, Anti-Backdoor Learning: Training Clean Models on "
                            "Poisoned Data, NeurIPS 2021",
                      repo="bboylyg/ABL", path="backdoor_isolation.py, backdoor_unlearning.py, config.py",
                      commit="3fd736ce0906f24b0672b471ae20016362eefde4",
                      backdoorbench="config/defense/abl/cifar10.yaml"),)
    deviations = (
        Deviation("isolation objective", ours="LGA, sign(loss - gamma) * loss, gamma 0.5",
                  theirs="config.py defaults to flooding (LGA selectable); the paper's method is LGA",
                  bb="flooding", why="the paper's method; loss=flooding runs the code's default"),
        Deviation("unlearning epochs", ours="4 epochs of ascent",
                  theirs="unlearning_epochs 5, the first only evaluates (backdoor_unlearning.py)", bb="20 at lr 1e-4",
                  why="the same 4 ascent epochs"),
        Deviation("quick profile", ours="5 isolation and 10 finetuning epochs (lr drop at 7)",
                  theirs="10 and 60 (drop at 40)", bb="20 and 60",
                  why="the quick profile trains its models for 10 epochs"),
    )
    profile_settings = {"tuning_epochs": {"quick": 5}, "finetuning_epochs": {"quick": 10},
                        "milestones": {"quick": (7,)}}
    # BackdoorBench's defense/abl.py: its lr for finetuning and unlearning are set in the code (its YAML's are unused).
    variant_defaults = {"bb": {"loss": "flooding", "tuning_epochs": 20, "lr": 0.01, "batch_size": 256,
                               "finetuning_lr": 0.01, "cutout": 0, "unlearning_epochs": 20, "unlearning_lr": 1e-4}}

    def train(self, data, clean, ctx):
        c = self.config
        model, isolated = self.isolate(data, ctx)
        rest, suspects = split(data, isolated)
        if c.finetuning_epochs:
            train(model, rest, self.optim(c.finetuning_epochs, c.finetuning_lr, milestones=c.milestones, crop=c.crop,
                                          flip=c.flip, cutout=c.cutout), seed=ctx.seed, desc="abl finetuning",
                  progress=ctx.progress)
        if c.unlearning_epochs:
            train(model, suspects, self.optim(c.unlearning_epochs, c.unlearning_lr), seed=ctx.seed, step=Ascent(),
                  desc="abl unlearning", progress=ctx.progress,
                  on_epoch=lambda e, loss: ctx.log_metric("defense.unlearning_loss", loss, e))
        return model

    def isolate(self, data, ctx):
        """(the isolation's model, a bool mask of the rows it isolates): LGA training from a fresh model,
        then the ``isolation`` share of rows with the lowest loss."""
        c = self.config
        model = ctx.build_model()
        train(model, data, self.optim(c.tuning_epochs, c.lr), seed=ctx.seed, step=LGA(c.gamma, c.loss == "flooding"),
              desc="abl isolation", progress=ctx.progress,
              on_epoch=lambda e, loss: ctx.log_metric("defense.isolation_loss", loss, e))
        isolated = ranked_share(losses(model, data), c.isolation, highest=False)
        ctx.log_metric("defense.isolated", float(isolated.sum()), None)
        return model, isolated

    def optim(self, epochs: int, lr: float, **augment) -> Optim:
        """Every phase's SGD (Nesterov, momentum 0.9), constant lr unless ``milestones`` are given."""
        return Optim(epochs=epochs, lr=lr, batch_size=self.config.batch_size, momentum=0.9, nesterov=True,
                     weight_decay=self.config.weight_decay, **augment)


@hookimpl
def register_defenses(register):
    register(ABL)
