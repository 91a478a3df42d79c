"""STRIP (Gao et al., ACSAC 2019): input-level. A trigger dominates the model's decision whatever else
the image holds, so a triggered input superimposed with clean images keeps its (target) prediction,
while a clean input's predictions scatter. Each input is superimposed with N clean images, and its
score is minus the mean Shannon entropy of the N predictions: low entropy, high suspicion.

Settings of the official code (garrisongys/STRIP, ``STRIP_CIFAR10DeepArchit_Tb.ipynb``): N = 100
overlays; the superimposition adds the two images, ``input + overlay`` on [0, 1] pixels, unclipped
(``cv2.addWeighted(input, 1, overlay, 1, 0)`` on float images); entropy in bits, averaged over the
N. BackdoorBench (``detection_infer/strip.py``) keeps N = 100 and the weight 1 but adds the
*normalised* images (the sum then lies one dataset mean away from the authors' sum).

Where we differ: the N overlays are drawn once, at ``prepare``, from the defender's clean share,
seeded by the context's seed, and every input gets the same N; the authors draw N of 10,000
held-out training images afresh for each input (BackdoorBench: per batch of 128). A fixed draw
keeps an input's score independent of its batch and its place in the stream. The decision is the
engine's: the clean share's score quantile at the grid's false-positive rate. The authors fit a
normal to the clean inputs' entropies and flag below its 1 % quantile (a preset FRR of 1 %),
BackdoorBench takes the clean entropies' 10 % quantile: the same rule, a quantile of the clean
entropies at a chosen false-rejection rate, so STRIP makes no decision of its own and is compared
with the other detectors at one rate. The engine scores the clean share it drew the overlays from,
so each overlay image is once superimposed with itself there (one of its N predictions).
"""
from dataclasses import dataclass

from nadbench import Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.perturb import draw, overlay_entropy
from nadbench.training.augment import to_float


@dataclass(frozen=True)
class STRIPConfig:
    overlays: int = param(100, "clean images superimposed on each input (N)", min=1)
    weight: float = param(1.0, "weight of the overlay: input + weight x overlay, unclipped", min=0.0)


class STRIP(Detector):
    name = "strip"
    level = "input"
    Config = STRIPConfig
    description = "superimpose 100 clean images; low mean prediction entropy = triggered"
    sources = (Source(paper="Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "
                            "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks, ACSAC 2019",
                      repo="garrisongys/STRIP", path="STRIP_CIFAR10DeepArchit_Tb.ipynb",
                      commit="6588a38511bbbb31901911699bfd9c5a4e55c53e",
                      backdoorbench="config/detection/strip/cifar10.yaml"),)
    deviations = (
        Deviation("overlays", ours="N clean-share images drawn once (seeded), the same for every input",
                  theirs="N held-out training images drawn afresh per input, with replacement",
                  bb="N clean images drawn afresh per batch",
                  why="an input's score must not depend on its batch or its place among the inputs"),
        Deviation("decision", ours="the engine's: the clean share's score quantile at the grid's FPR (5 % by default)",
                  theirs="a normal fitted to clean entropies, flag below its quantile at FRR 1 %",
                  bb="the clean entropies' empirical quantile at 10 %",
                  why="the same rule at the rate every detector of a grid is compared at"),
        Deviation("superimposition", ours="input + overlay on [0, 1] pixels, unclipped", theirs="the same",
                  bb="the normalised images added (one dataset mean away from the authors' sum)",
                  why="BackdoorBench's sum differs; ours is the authors'"),
    )

    def prepare(self, model, clean, ctx):
        if len(clean) == 0:
            raise ValueError("STRIP superimposes clean images on each input: it needs a clean share")
        rows = draw(len(clean), self.config.overlays, ctx.seed)
        self.overlays = to_float(clean.images[rows].to(ctx.device))

    def score(self, model, images):
        return -overlay_entropy(model, images, self.overlays, self.config.weight)


@hookimpl
def register_detectors(register):
    register(STRIP)
