"""Feature shift tuning, FST (Min et al., NeurIPS 2023, "Towards Stable Backdoor Purification through
Feature Shift Tuning"): reinitialise the linear head, then finetune the whole model while pushing
the new head away from the backdoored one, so that the features must shift rather than the head
merely re-reading the backdoored features.

Loss ``CE + alpha * <W, W_0>`` (W the head's weight, W_0 the backdoored head's), and after every
step the head's weight is rescaled to W_0's norm. Settings of the official code
(AISafety-HKUST/stable_backdoor_purification, ``fine_tune/ft.py --ft_mode fst`` and its README's CIFAR-10
command): alpha 0.1, lr 0.01 with a cosine decay over 10 epochs, SGD momentum 0.9 without weight
decay, batch 128, random crop (4 px) and flip, the head reinitialised uniform in
+-1/sqrt(fan in). Its lr is kept in every profile (10 epochs are affordable on a CPU: no
reduction on ``quick``). The head is the model's declared ``classifier_layer``.
"""
from dataclasses import dataclass

import torch

from nadbench import ConfigError, Defense, Deviation, Source, hookimpl, param
from nadbench.training.train import Optim, Step, train


@dataclass(frozen=True)
class FSTConfig:
    alpha: float = param(0.1, "weight of the head-alignment penalty <W, W_0>", min=0.0)
    epochs: int = param(10, "finetuning epochs (cosine learning-rate decay)", min=1, max=1000)
    lr: float = param(0.01, "initial learning rate", min=0.0, max=10.0)
    batch_size: int = param(128, "batch size", min=1, max=65536)


class FeatureShiftStep(Step):
    """Cross-entropy plus ``alpha * <W, W_0>`` on the head, whose weight keeps W_0's norm."""

    def __init__(self, head: torch.nn.Linear, original: torch.Tensor, alpha: float):
        self.head, self.original, self.alpha = head, original, alpha
        self.norm = original.norm()

    def loss(self, model, x, y):
        return super().loss(model, x, y) + self.alpha * (self.head.weight * self.original).sum()

    def update(self, model, x, y, optimizer):
        loss = super().update(model, x, y, optimizer)
        with torch.no_grad():
            self.head.weight.mul_(self.norm / self.head.weight.norm())
        return loss


class FST(Defense):
    name = "fst"
    Config = FSTConfig
    description = "reinitialised head, finetuning that pushes it away from the backdoored one (feature shift)"
    sources = (Source(paper="Min, Qin, Shen & Cheng, "
                            "Towards Stable Backdoor Purification through Feature Shift Tuning, NeurIPS 2023",
                      repo="AISafety-HKUST/stable_backdoor_purification", path="fine_tune/ft.py",
                      commit="37d2ef5cf4a0a0adb517813113808baad56f53f5"),)
    deviations = (Deviation("alpha", ours="0.1", theirs="0.1 in the README's CIFAR-10 command (parser default 0.2)",
                            why="the authors' CIFAR-10 run"),)
    uses_classifier = True

    def defend(self, model, clean, ctx):
        cfg = self.config
        if not ctx.classifier_layer:
            raise ConfigError(f"fst reinitialises the model's classifier layer, and {ctx.student!r} declares none: "
                              "set classifier_layer in its ModelSpec")
        head = model.get_submodule(ctx.classifier_layer)
        original = head.weight.detach().clone()
        bound = 1 / head.weight.shape[1] ** 0.5
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for p in (q for q in (head.weight, head.bias) if q is not None):
                p.copy_(torch.rand(p.shape, generator=gen).mul_(2 * bound).sub_(bound))
        optim = Optim(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.9, nesterov=False,
                      weight_decay=0.0, schedule="cosine", crop=4, flip=True)
        return train(model, clean, optim, seed=ctx.seed, step=FeatureShiftStep(head, original, cfg.alpha),
                     desc="fst", progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(FST)
