"""TeCo (Liu et al., CVPR 2023): input-level, hard labels only. A backdoored model's prediction of a
clean input survives the common corruptions about equally long (up to similar severities), while a
triggered input's prediction holds under corruptions that spare the trigger and falls at once under
those that erase it. For each corruption type, TeCo finds the first severity (1..5) at which the
prediction differs from the uncorrupted one (6 when none does); the score is the standard deviation
of those severities across the types: high deviation, high suspicion.

Settings of the official code (CGCL-codes/TeCo, ``defense/teco/teco.py``, the same in BackdoorBench's
``detection_infer/teco.py``): the 15 common corruptions of the ``imagecorruptions`` package at its
severities 1..5, "never changed" counted as 6 (``--max 6``), the population standard deviation
(``np.std``). No clean data, no threshold: the authors report AUROC. Here the corruptions are
``nadbench.toolkit.corruptions`` (the package's v1.1.2 constants, in torch).

Where we differ: ``frost`` is missing (it blends frost photographs shipped inside the package), so
14 types. The package draws its noise, offsets, angles and layers afresh per image; here too, from a
generator seeded by the image's pixels, the context's seed and the corruption, so that a score does
not depend on the batch or the order the inputs come in. The official code (and BackdoorBench's)
corrupts its list of images in place, so each severity and each type is applied on top of all the
earlier ones; here every corruption is applied to the input itself, as the method is described (the
severity at which each corruption of the input changes its prediction). Severities after a type's
first change are not computed: they cannot change the score. The decision is the engine's (the clean
share's score quantile at the grid's false-positive rate); TeCo reads nothing else from the share.
"""
from dataclasses import dataclass

import torch

from nadbench import Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.corruptions import AVAILABLE, COMMON, SEVERITIES, corrupt, image_seeds
from nadbench.toolkit.features import logits


@dataclass(frozen=True)
class TeCoConfig:
    corruptions: tuple = param(AVAILABLE, "corruption types (nadbench.toolkit.corruptions)", choices=AVAILABLE,
                               nonempty=True)
    severities: int = param(SEVERITIES, "severities tried per type, 1..n; never changed counts n + 1",
                            min=1, max=SEVERITIES)


class TeCo(Detector):
    name = "teco"
    level = "input"
    Config = TeCoConfig
    description = "std across 14 corruption types of the severity that first changes the prediction"
    sources = (Source(paper="Liu, Li, Wang, Hu, Ye, Jin, Wu & Xiao, Detecting Backdoors During the Inference "
                            "Stage Based on Corruption Robustness Consistency, CVPR 2023",
                      repo="CGCL-codes/TeCo", path="BackdoorBench-v1.0-merge/defense/teco/teco.py",
                      commit="4eacfaf49f0215a8ab2ffe3a94bee6268a3c4e63",
                      backdoorbench="config/detection/teco/cifar10.yaml"),
               Source(paper="Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common "
                            "Corruptions and Perturbations, ICLR 2019 (the corruptions, as packaged)",
                      repo="bethgelab/imagecorruptions", path="imagecorruptions/corruptions.py",
                      commit="d03ee68843a9be8fda4c94a9ad8aad767a3f437e"))
    deviations = (
        Deviation("corruption types", ours="14: the package's 15 common ones but frost",
                  theirs="the 15 common corruptions of imagecorruptions", bb="the same 15",
                  why="frost blends photographs shipped inside the package, which is not available here"),
        Deviation("random draws", ours="per image, from a generator seeded by its pixels, the run's seed and the "
                                       "corruption", theirs="per image, from NumPy's global random state",
                  bb="the same as theirs",
                  why="an input's score must not depend on its batch or its place among the inputs"),
        Deviation("what is corrupted", ours="the input, at each type and severity",
                  theirs="the official code's image list, corrupted in place: each severity and type on top "
                         "of all earlier ones", bb="the same as theirs",
                  why="the method, as described, corrupts the input; the compounding comes from updating "
                      "the list in place"),
        Deviation("decision", ours="the engine's: the clean share's score quantile at the grid's FPR",
                  theirs="none (AUROC and the best F1 over thresholds)", bb="the same as theirs",
                  why="every detector of a grid is compared at one rate"),
    )

    def prepare(self, model, clean, ctx):
        self.seed, self.device = ctx.seed, ctx.device

    def score(self, model, images):
        images = images.to(self.device)
        original = logits(model, images).argmax(1)
        first = torch.full((len(images), len(self.config.corruptions)), float(self.config.severities + 1),
                           device=images.device)  # never changed: n + 1
        for t, name in enumerate(self.config.corruptions):
            alive = torch.arange(len(images), device=images.device)  # not changed yet by this type
            for severity in range(1, self.config.severities + 1):
                if len(alive) == 0:
                    break
                x = images[alive]
                seeds = image_seeds(x, self.seed, COMMON.index(name), severity)
                changed = logits(model, corrupt(x, name, severity, seeds)).argmax(1) != original[alive]
                first[alive[changed], t] = float(severity)
                alive = alive[~changed]
        return first.std(1, unbiased=False)


@hookimpl
def register_detectors(register):
    register(TeCo)
