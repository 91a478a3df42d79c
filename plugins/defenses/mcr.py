"""Mode connectivity repair (Zhao et al., ICLR 2020): a path of low clean loss between the backdoored
model and a finetuned copy of it, whose middle forgets the backdoor.

1. Endpoints: the backdoored model (t = 0) and a copy finetuned on the clean subset (t = 1, the
   FinetuneParams fields: the same finetuning as the ``finetune`` defense), both fixed.
2. A Bezier curve between them, ``bends`` control points (1: quadratic,
   (1-t)^2 w0 + 2t(1-t) w1 + t^2 w2), initialised on the straight line and trained on the clean
   subset with one t ~ U(0, 1) per batch. Every parameter is on the curve, batch-norm affine
   parameters included.
3. The repaired model is the point at ``t`` (0.3, the NAD paper's Table 1), its batch-norm
   statistics recomputed on the clean subset (shuffled, with the training crop and flip).

Curve training follows the MCR authors' code (SGD, momentum 0.9, weight decay 1e-4, batch 128)
except its length, learning rate and schedule: 20 epochs from lr 0.05 with a cosine decay, where
the authors train 100 epochs at lr 0.01 (``--set mcr.curve_epochs=100 --set mcr.curve_lr=0.01``),
so that a CPU grid stays affordable. At 0.05 the curve leaves the straight line and its middle
loses most of the backdoor on the test suite's CIFAR-10 subset (tests/test_defenses_e2e.py,
benchmarks/results/test-margins-intel-amx.md); an exploratory run at 0.01 (not committed) stayed
nearer the line.
``curve_points`` points along t (endpoints included) come back as extra models: the engine
evaluates their ACC and ASR, the method's own picture; clean accuracy along t on the clean subset
is logged here as ``curve.clean_acc`` and as a plot.
"""
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from nadbench import Defended, Defense, Deviation, Source, hookimpl, param
from nadbench.toolkit.channels import recompute_bn
from nadbench.engine.figures import line_figure
from nadbench.training.evaluate import accuracy
from nadbench.training.train import FinetuneParams, Optim, train


@dataclass(frozen=True)
class MCRConfig(FinetuneParams):
    t: float = param(0.3, "the point of the curve returned as the repaired model", min=0.0, max=1.0)
    bends: int = param(1, "control points of the Bezier curve (1: quadratic)", min=1, max=8)
    curve_epochs: int = param(20, "epochs of curve training", min=1, max=1000)
    curve_lr: float = param(0.05, "curve training learning rate (cosine decay)", min=0.0, max=10.0)
    curve_batch_size: int = param(128, "curve training batch size", min=1, max=65536)
    curve_weight_decay: float = param(1e-4, "curve training weight decay", min=0.0, max=1.0)
    curve_points: int = param(11, "points along t evaluated by the engine (0: none)", min=0, max=101)


class BezierCurve(nn.Module):
    """The weights w(t) = sum_k C(n, k) t^k (1-t)^(n-k) w_k of ``base``'s architecture, with fixed
    ends w_0 = ``start`` and w_n = ``end`` and trainable control points w_1 .. w_(n-1). In training
    mode each forward draws its own t ~ U(0, 1)."""

    def __init__(self, base: nn.Module, start: nn.Module, end: nn.Module, bends: int, seed: int):
        super().__init__()
        self.base = copy.deepcopy(base).requires_grad_(False)
        self.names = [n for n, _ in base.named_parameters()]
        ends = dict(start.named_parameters()), dict(end.named_parameters())
        for i, n in enumerate(self.names):
            self.register_buffer(f"start{i}", ends[0][n].detach().clone())
            self.register_buffer(f"end{i}", ends[1][n].detach().clone())
        # On the straight line, evenly spaced: control point k (from 1) at t = k / (bends + 1).
        self.controls = nn.ParameterList(
            nn.Parameter(torch.lerp(ends[0][n].detach(), ends[1][n].detach(), (k + 1) / (bends + 1)))
            for k in range(bends) for n in self.names)
        self.bends = bends
        self.gen = torch.Generator().manual_seed(seed)

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        n = self.bends + 1
        coeff = [math.comb(n, k) * t ** k * (1 - t) ** (n - k) for k in range(n + 1)]
        out = {}
        for i, name in enumerate(self.names):
            points = [getattr(self, f"start{i}")] + [self.controls[k * len(self.names) + i] for k in range(self.bends)] \
                + [getattr(self, f"end{i}")]
            out[name] = sum(c * p for c, p in zip(coeff, points) if c != 0)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = float(torch.rand((), generator=self.gen)) if self.training else 0.5
        return functional_call(self.base, self.weights(t), (x,))

    @torch.no_grad()
    def point(self, t: float, clean, batch_size: int, crop: int = 0, flip: bool = False) -> nn.Module:
        """The model at ``t``, batch-norm statistics recomputed on ``clean`` (see ``recompute_bn``)."""
        model = copy.deepcopy(self.base)
        model.load_state_dict(self.weights(t), strict=False)
        return recompute_bn(model.requires_grad_(True), clean, batch_size, crop, flip)


class MCR(Defense):
    name = "mcr"
    Config = MCRConfig
    description = "Bezier curve between the model and its finetuned copy; the point at t = 0.3"
    sources = (Source(paper="Zhao, Chen, Das, Ramamurthy & Lin, "
                            "Bridging Mode Connectivity in Loss Landscapes and Adversarial Robustness, ICLR 2020",
                      repo="IBM/model-sanitization", path="backdoor/backdoor-cifar/train.py",
                      commit="1eff7e9f35e4fd194ffc83a55e4f6688ca9bb5c3",
                      backdoorbench="config/defense/mcr/cifar10.yaml"),)
    deviations = (Deviation("curve training", ours="20 epochs, lr 0.05 cosine",
                            theirs="100 epochs, lr 0.01 constant to 50 % then decayed", bb="100 epochs, lr 3e-5 cosine",
                            why="a CPU grid stays affordable; --set mcr.curve_epochs=100 mcr.curve_lr=0.01"),
                  Deviation("bends", ours="1 (quadratic)", theirs="3", bb="3", why="the NAD paper's quadratic curve"),
                  Deviation("t", ours="0.3", theirs="swept", bb="0.1", why="the NAD paper's Table 1"))
    # The finetuned endpoint: the quick profile's lower finetuning lr (core/engine/grid.py).
    profile_settings = {"lr": "finetune_lr"}

    def defend(self, model, clean, ctx):
        cfg = self.config
        start = copy.deepcopy(model)
        end = train(model, clean, cfg.optim(), seed=ctx.seed, desc="mcr endpoint", progress=ctx.progress,
                    on_epoch=lambda e, loss: ctx.log_metric("endpoint.loss", loss, e))
        curve = BezierCurve(start, start, end, cfg.bends, ctx.seed).to(next(model.parameters()).device)
        optim = Optim(epochs=cfg.curve_epochs, lr=cfg.curve_lr, batch_size=cfg.curve_batch_size, momentum=0.9,
                      weight_decay=cfg.curve_weight_decay, schedule="cosine", crop=cfg.crop, flip=cfg.flip,
                      cutout=cfg.cutout)
        train(curve, clean, optim, seed=ctx.seed + 1, desc="mcr curve", progress=ctx.progress,
              on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))

        ts = [i / (cfg.curve_points - 1) for i in range(cfg.curve_points)] if cfg.curve_points > 1 else []
        point = lambda t: curve.point(t, clean, cfg.curve_batch_size, cfg.crop, cfg.flip)  # noqa: E731
        extras = {t: start if t == 0 else end if t == 1 else point(t) for t in ts}
        clean_acc = {t: accuracy(m, clean) for t, m in extras.items()}
        for i, acc in enumerate(clean_acc.values()):
            ctx.log_metric("curve.clean_acc", acc, i)
        if clean_acc:
            ctx.log_figure(line_figure(list(clean_acc), {"clean-subset ACC": [100 * a for a in clean_acc.values()]},
                                       "t (0: backdoored, 1: finetuned)", "%", vline=(cfg.t, f"repaired: t = {cfg.t:g}")),
                           "curve_clean_acc.png")
        repaired = extras[cfg.t] if cfg.t in extras else point(cfg.t)
        return Defended(repaired, extras, axis="t")


@hookimpl
def register_defenses(register):
    register(MCR)
