"""IBD-PSC (Hou, Feng, Hua, Luo, Zhang & Li, ICML 2024): input-level, parameter-oriented scaling
consistency. Amplifying the batch-norm parameters of a backdoored model's last layers leaves its
confidence in a triggered input's (target) prediction high, while its confidence in a clean input's
prediction falls. An input's PSC is the mean, over n amplified copies of the model, of the softmax
probability they give the original model's prediction: high PSC, high suspicion. The score returned
is -log(1 - PSC), in the same order, computed from the other classes' probabilities: PSC itself, a
mean of float32 probabilities, rounds to 1 (ties) for the most confident inputs, the ones that matter.

The copies: copy k (k = 1..n) multiplies the weight and bias of the last ``start + k`` BatchNorm2d
layers (in module order) by the scale. ``start`` is chosen on the clean share at ``prepare``: the
least number of last BN layers whose amplification makes the model err on more than a share xi of
the clean images (their labels), so that the copies are amplified enough to shake clean predictions.

Settings of the official code (BackdoorBox, ``core/defenses/IBD_PSC.py``, the authors' code): n = 5
copies, xi = 0.6, scale 1.5 (weight and bias; running statistics untouched), the start searched from
1 layer up; the authors' validation set is 2,000 held-out clean images, here the clean share.
BackdoorBench has no IBD-PSC.

Where we differ: the model given is never changed (the copies are deep copies, made once at
``prepare``). Where no number of layers raises the clean error above xi, the official code has no
start and fails; here the copies then amplify the last L - n + 1, ..., L of the L BN layers. The
decision is by default the engine's (the clean share's score quantile at the grid's false-positive
rate); ``own_decision`` flags PSC >= T = 0.9 instead, the authors' rule.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from nadbench import Detection, Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.features import logits


@dataclass(frozen=True)
class IBDPSCConfig:
    n: int = param(5, "amplified copies: copy k scales the last start + k BN layers", min=1, max=100)
    xi: float = param(0.6, "the start: least number of last BN layers whose scaling errs on > xi of the clean share",
                      min=0.0, max=1.0)
    scale: float = param(1.5, "factor on the weight and bias of the amplified BN layers", min=0.0, min_exclusive=True)
    own_decision: bool = param(False, "flag PSC >= T (the authors' rule) instead of the engine's threshold at the FPR")
    T: float = param(0.9, "the authors' threshold on PSC (with own_decision)", min=0.0, max=1.0)


def amplified(model: nn.Module, layers: int, scale: float) -> nn.Module:
    """A deep copy of ``model`` whose last ``layers`` BatchNorm2d layers (in module order) have their
    weight and bias multiplied by ``scale``, in eval mode."""
    out = copy.deepcopy(model).eval()
    norms = [m for m in out.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms[max(len(norms) - layers, 0):] if layers > 0 else []:
            m.weight.mul_(scale)
            m.bias.mul_(scale)
    return out


def _doubt(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """1 - the softmax probability of ``label`` (N, 1): the probability of the other classes, summed
    without cancellation."""
    z = logit.double()
    return torch.exp(z.scatter(1, label, -torch.inf).logsumexp(1) - z.logsumexp(1))


class IBDPSC(Detector):
    name = "ibd-psc"
    level = "input"
    Config = IBDPSCConfig
    description = "mean confidence in the original prediction of 5 copies with amplified last BN layers (x1.5)"
    sources = (Source(paper="Hou, Feng, Hua, Luo, Zhang & Li, IBD-PSC: Input-level Backdoor Detection via "
                            "Parameter-oriented Scaling Consistency, ICML 2024",
                      repo="THUYimingLi/BackdoorBox", path="core/defenses/IBD_PSC.py",
                      commit="af3afd1c0b172cbf4b0f8c030a9afa0fecc13fc1"),)
    deviations = (
        Deviation("no start found", ours="the copies scale the last L - n + 1 .. L of the L BN layers",
                  theirs="no start (None): the code fails",
                  why="a model that stays accurate however many BN layers are scaled still gets n copies"),
        Deviation("validation set", ours="the defender's clean share", theirs="2,000 held-out clean test images",
                  why="the clean data a defender has in the grid"),
        Deviation("decision", ours="the engine's: the clean share's score quantile at the grid's FPR",
                  theirs="PSC >= T = 0.9 (own_decision = true)",
                  why="every detector of a grid is compared at one rate"),
        Deviation("score", ours="-log(1 - PSC), computed without cancellation", theirs="PSC",
                  why="the same order, kept apart where float32 scores would round PSC to 1"),
    )

    def prepare(self, model, clean, ctx):
        if len(clean) == 0:
            raise ValueError("IBD-PSC chooses its layers on clean images: it needs a clean share")
        total = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        if total == 0:
            raise ValueError("IBD-PSC amplifies batch-norm layers: the model has no BatchNorm2d")
        cfg = self.config
        self.start = next((k for k in range(1, total) if self._error(amplified(model, k, cfg.scale), clean) > cfg.xi),
                          max(1, total - cfg.n))
        ctx.log_metric("ibd_psc.start", self.start, None)
        self.copies = [amplified(model, min(self.start + k, total), cfg.scale) for k in range(1, cfg.n + 1)]
        self.device = ctx.device

    @staticmethod
    def _error(model, clean) -> float:
        predicted = logits(model, clean.images).argmax(1)
        return float((predicted != clean.labels.to(predicted.device)).float().mean())

    def score(self, model, images):
        images = images.to(self.device)
        predicted = logits(model, images).argmax(1)[:, None]
        # 1 - PSC: the copies' mean probability of the other classes
        doubt = torch.stack([_doubt(logits(c, images), predicted) for c in self.copies]).mean(0)
        score = -torch.log(doubt.clamp_min(1e-300))
        return Detection(score, 1 - doubt >= self.config.T) if self.config.own_decision else score


@hookimpl
def register_detectors(register):
    register(IBDPSC)
