"""Neural Attention Distillation (Li et al., ICLR 2021).

1. Teacher: a copy of the backdoored model finetuned on the clean subset (``teacher_epochs``).
2. Student: the backdoored model trained on the same subset with
   CE + sum_l beta_l * L_NAD(A(F_T^l), A(F_S^l)) at the model's attention layers.

Defaults: betas 500/1000/1000 on the three WRN groups with the official code's mean-squared form
of the loss (``loss="l2"`` gives the paper's formula), lr 0.1 dropping to 0.01 after 2 epochs, and,
where the paper and the official code disagree, the paper's Table 1 setting: the student trained
10 epochs (the official code's final release trains 20: ``--set nad.epochs=20``) after a teacher
finetuned 10 epochs (the paper: 5-10). The teacher starts from the supplier's model of the
teacher architecture (``ctx.supplied_model``: the backdoored model itself when the architectures
match; in a grid, the engine's backdoored model of the teacher architecture; in ``bench defend``,
the ``--teacher`` file); when there is none (teacher source "scratch"), a fresh network of that
architecture, trained on the clean subset for ``teacher_epochs``.

The teacher is returned beside the student (``Defended.models``), so the engine measures it too
(``teacher.acc`` / ``teacher.asr``): with the ``finetune`` defense's settings and seed it *is* that
defense's model, and NAD beats finetuning only where the student goes past its own teacher.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nadbench import ConfigError, Defended, Defense, Deviation, Source, hookimpl, param
from nadbench.training.attention import KINDS, check_spatial, nad_loss, tap
from nadbench.training.train import FinetuneParams, train


@dataclass(frozen=True)
class NADConfig(FinetuneParams):
    epochs: int = param(10, "student (distillation) epochs (the paper's 10; official code 20)", min=1, max=1000)
    teacher_epochs: int = param(10, "epochs of finetuning that make the teacher", min=1, max=1000)
    teacher_lr: float | None = param(None, "initial learning rate of the teacher (none: lr)", min=0.0, max=10.0)
    betas: tuple[float, ...] = param((500.0, 1000.0, 1000.0), "weight of the attention loss per layer",
                                     min=0.0, nonempty=True)
    attention: str = param("mean_p", "attention function", choices=KINDS)
    p: float = param(2.0, "exponent of the attention function", min=0.5, max=8.0)
    loss: str = param("mse", "mse (official code) or l2 (paper formula)", choices=("mse", "l2"))


class NAD(Defense):
    name = "nad"
    Config = NADConfig
    description = "finetuned teacher + attention distillation into the backdoored student"
    sources = (Source(paper="Li, Lyu, Koren, Lyu, Li & Ma, "
                            "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, "
                            "ICLR 2021",
                      repo="bboylyg/NAD", path="main.py", commit="f17b71390f61fe24335728bfea53e4fe86ee450b",
                      backdoorbench="config/defense/nad/cifar10.yaml"),)
    deviations = (Deviation("student epochs", ours="10 (the paper's Table 1)", theirs="20 (final release)",
                            bb="10 (te_epochs, as its teacher), lr 0.01 cosine",
                            why="where paper and code disagree, the paper's"),
                  Deviation("attention layers", ours="the model's declared layers (WRN: the three groups)",
                            theirs="the three groups", bb="layer3, layer4 and the 1x1 pooled output",
                            why="a 1x1 map's NAD term is zero"))
    # Teacher and student: the quick profile's lower finetuning lr (core/engine/grid.py).
    profile_settings = {"lr": "finetune_lr"}
    uses_teacher = True

    def check(self, student_layers, teacher_layers):
        if not (len(student_layers) == len(teacher_layers) == len(self.config.betas)):
            raise ConfigError(f"nad.betas has {len(self.config.betas)} value(s) but the student has "
                              f"{len(student_layers)} attention layers ({', '.join(student_layers)}) and the "
                              f"teacher {len(teacher_layers)}: give one beta per layer")

    def defend(self, model, clean, ctx):
        cfg = self.config
        teacher = ctx.supplied_model(ctx.teacher)
        if teacher is None:
            teacher = ctx.build_model(ctx.teacher)
        teacher_optim = dataclasses.replace(cfg.optim(cfg.teacher_epochs), lr=cfg.lr if cfg.teacher_lr is None else cfg.teacher_lr)
        train(teacher, clean, teacher_optim, seed=ctx.seed, desc="nad teacher",
              progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("teacher.loss", loss, e))
        teacher.eval().requires_grad_(False)

        s_layers, t_layers = ctx.student_layers, ctx.teacher_layers
        self.check(s_layers, t_layers)

        def loss_fn(student, x, y):
            with torch.no_grad(), tap(teacher, t_layers) as t_feats:
                teacher(x)
            with tap(student, s_layers) as s_feats:
                logits = student(x)
            check_spatial(s_feats, s_layers)
            at = sum(b * nad_loss(ft, fs, cfg.attention, cfg.p, cfg.loss)
                     for b, ft, fs in zip(cfg.betas, t_feats, s_feats))
            return F.cross_entropy(logits, y) + at

        student = train(model, clean, cfg.optim(), seed=ctx.seed + 1, loss_fn=loss_fn, desc="nad student",
                        progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))
        # The teacher is measured too (teacher.acc / teacher.asr): NAD's outcome reads against it.
        return Defended(student, models={"teacher": teacher})


@hookimpl
def register_defenses(register):
    register(NAD)
