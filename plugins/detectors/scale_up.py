"""SCALE-UP (Guo, Li, Chen, Guo, Sun & Liu, ICLR 2023): input-level, black-box (predicted labels
only). Amplifying all pixel values of a triggered input (x -> clip(n * x, 0, 1)) keeps its target
prediction far more often than a clean input keeps its own: the scaled prediction consistency,
SPC(x) = the share of the amplified images predicted as x is. The score is the SPC: high, suspicious.

Settings of the official code (JunfengGo/SCALE-UP, ``torch_model_wrapper.py``): factors n = 1..11,
the prediction at n = 1 the original, pixels clipped to [0, 1] after amplifying; SPC is the mean
agreement over the 11 (``test.py``). BackdoorBox (``core/defenses/SCALE_UP.py``) amplifies by 3, 5,
7, 9, 11 (``--set scale-up.scales=3,5,7,9,11``).

Clean data: the default is the paper's data-limited SCALE-UP (its main pipeline, Fig. 4), as every
grid hands input detectors the defender's clean share. The clean share's SPC gives a mean and a
standard deviation per class (its images grouped by their prediction, as an input is), and an
input's SPC is standardised with those of its predicted class, so that a class whose clean images
are naturally consistent under amplification is not flagged for it. A class with fewer than two
clean images takes the whole share's statistics; a deviation below one factor's share (1 / factors)
counts as that share. The official script and BackdoorBox default to the data-free SPC (no clean
data): the variant ``scale-up@free``. Its scores take few values, and where more clean inputs than
the grid's false-positive rate keep their prediction at every factor, as triggered ones do, the
engine's threshold (scores above the clean share's quantile) flags none. BackdoorBox's
data-limited option standardises with one global mean and deviation, which changes no ranking.

Where we differ otherwise: the official script adds uniform noise in [0, 0.02) to every input
before amplifying; not here (BackdoorBox adds none, and a score must not rest on a random draw per
input). The decision is the engine's (the clean share's score
quantile at the grid's false-positive rate); the paper's is a defender-specified threshold T on
the (standardised) SPC (BackdoorBox: 0.5).
"""
from dataclasses import dataclass

import torch

from nadbench import Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.perturb import scaled_labels


@dataclass(frozen=True)
class ScaleUpConfig:
    scales: tuple[int, ...] = param(tuple(range(1, 12)), "factors n the pixels are amplified by: clip(n x, 0, 1)",
                                    min=1, nonempty=True)
    data_limited: bool = param(True, "standardise the SPC with the clean share's mean and deviation in the "
                                     "input's predicted class (the paper's data-limited SCALE-UP)")


def spc(model, images, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """(the share of ``scales`` whose amplified image keeps each image's prediction, that prediction)."""
    labels = scaled_labels(model, images, (1, *scales))
    return (labels[:, 1:] == labels[:, :1]).float().mean(1), labels[:, 0]


class ScaleUp(Detector):
    name = "scale-up"
    level = "input"
    Config = ScaleUpConfig
    description = "amplify pixel values x1..x11; consistent predictions (SPC, per-class standardised) = triggered"
    sources = (Source(paper="Guo, Li, Chen, Guo, Sun & Liu, SCALE-UP: An Efficient Black-box Input-level "
                            "Backdoor Detection via Analyzing Scaled Prediction Consistency, ICLR 2023",
                      repo="JunfengGo/SCALE-UP", path="torch_model_wrapper.py",
                      commit="a2c6d062ebe6f5ebe5f45ab2694e453190df403d"),
               Source(paper="Li, Ya, Bai, Jiang & Xia, BackdoorBox: A Python Toolbox for Backdoor Learning, "
                            "ICLR 2023 workshop (SCALE-UP as its authors packaged it)",
                      repo="THUYimingLi/BackdoorBox", path="core/defenses/SCALE_UP.py",
                      commit="af3afd1c0b172cbf4b0f8c030a9afa0fecc13fc1"))
    deviations = (
        Deviation("clean data", ours="data-limited: SPC standardised per predicted class on the clean share",
                  theirs="the official script and BackdoorBox default to the data-free SPC (the paper offers both)",
                  why="every grid gives input detectors a clean share, and the paper's main pipeline uses it"),
        Deviation("input noise", ours="none", theirs="uniform noise in [0, 0.02) added to every input (the script)",
                  why="BackdoorBox adds none, and a score must not rest on a random draw per input"),
        Deviation("decision", ours="the engine's: the clean share's score quantile at the grid's FPR (5 % by default)",
                  theirs="a defender-specified threshold T on the SPC (BackdoorBox: 0.5)",
                  why="every detector of a grid is compared at one false-positive rate"),
    )
    variant_defaults = {"free": {"data_limited": False}}

    def prepare(self, model, clean, ctx):
        self.stats = None
        if not self.config.data_limited:
            return
        if len(clean) == 0:
            raise ValueError("data-limited SCALE-UP standardises with the clean share's SPC: it needs a clean share")
        values, predicted = spc(model, clean.images, self.config.scales)
        floor = 1 / len(self.config.scales)
        mean = torch.full((ctx.num_classes,), float(values.mean()), device=values.device)
        std = torch.full_like(mean, float(values.std()) if len(values) > 1 else floor)
        for c in predicted.unique().tolist():
            v = values[predicted == c]
            if len(v) > 1:
                mean[c], std[c] = v.mean(), v.std()
        self.stats = mean, std.clamp(min=floor)

    def score(self, model, images):
        values, predicted = spc(model, images, self.config.scales)
        if self.stats is None:
            return values
        mean, std = self.stats
        return (values - mean[predicted]) / std[predicted]


@hookimpl
def register_detectors(register):
    register(ScaleUp)
