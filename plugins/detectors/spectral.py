"""Spectral Signatures (Tran, Li & Madry, NeurIPS 2018): data level, reads the model trained on the set.

A backdoor is learnt as a strong feature that the poisoned rows share and the clean rows of their
(target) class lack, so within that class the poisoned rows stand apart along the direction of largest
variance. Per class, the model's representations of its rows (here the inputs of the classifier layer)
are centred; ``v`` is the top right singular vector of that matrix, and a row's score is its squared
projection on ``v``. Scores of all classes are returned together (the engine ranks them as one list).

The score, as the official code computes it (MadryLab/backdoor_data_poisoning, ``compute_corr.py``, and
BackdoorBench's ``detection_pretrain/spectral.py`` after it): ``v`` comes from the centred rows, but the
rows projected on it are not centred, ``(r . v)^2``. The paper's Algorithm 1 projects the centred rows,
``((r - mean) . v)^2``: ``centred=true``. The two differ in what they assume. The paper's score is
two-tailed, and puts the poisoned rows on top only while they are a minority of their class (the mean
lies near the clean rows); the code's ranks the rows on the far side of the mean from the origin highest,
that is the poisoned rows when their representations are larger than the clean ones' (a strong
backdoor feature), whatever their share. Where the poisoned rows are about half of their class, the
paper's score cannot tell them from the clean ones (both lie equally far from the mean).

Decision: the authors remove the ``1.5 * eps`` highest-scoring share of the class they inspect (``eps``
the assumed poisoned share; their config's ``percentile: 85`` with ``eps`` = 10 %), then retrain. A
defender does not know the target class, so every class loses that share here (as BackdoorBench does
when it is not told the target), and that removal is this detector's own decision (``Detection.flagged``):
the decision of the method, with its cost (the same share of every clean class) in plain view.
``eps=0`` makes no decision, leaving the engine's threshold on the clean share. The top singular value
of each class is logged (``spectral.sigma``, step = the class).

Where we differ: the representation (see ``deviations``) and the classes inspected.
"""
from dataclasses import dataclass

import torch

from nadbench import Detection, Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.clusters import spectral_scores, top_share
from nadbench.toolkit.features import as_rows, by_class, penultimate


@dataclass(frozen=True)
class SpectralConfig:
    eps: float = param(0.1, "the assumed poisoned share of a class: the 1.5 x eps highest-scoring rows of every "
                            "class are flagged (0: no own decision, the engine thresholds the scores)",
                       min=0.0, max=0.66)
    centred: bool = param(False, "project the centred rows, ((r - mean) . v)^2, as the paper's Algorithm 1 "
                                 "(default: (r . v)^2, as the official code)")


class Spectral(Detector):
    name = "spectral"
    Config = SpectralConfig
    level = "data"
    description = "per class, squared projection on the top singular vector of the representations; flag 1.5 x eps"
    sources = (Source(paper="Tran, Li & Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018",
                      repo="MadryLab/backdoor_data_poisoning", path="compute_corr.py",
                      commit="c15096fdd79836e3e94a5cab54d50fe97a9c140f",
                      backdoorbench="config/detection/spectral/cifar10.yaml"),)
    deviations = (Deviation("classes inspected", ours="every class", theirs="the known target class only",
                            bb="the target class when given the attack's target label, else every class",
                            why="a defender does not know the target class"),
                  Deviation("representation", ours="the classifier layer's inputs (pooled last features)",
                            theirs="the flattened feature map entering the third-to-last residual unit",
                            bb="a layer named on the command line (--target_layer)",
                            why="a layer every model declares (ModelSpec.classifier_layer)"))

    def detect(self, data, clean, model, ctx):
        features = as_rows(penultimate(model, data.images, ctx.classifier_layer))
        scores = torch.zeros(len(data), dtype=torch.float64)
        for label, rows in by_class(data.labels.cpu()).items():
            class_scores, sigma = spectral_scores(features[rows], centred=self.config.centred)
            scores[rows] = class_scores
            ctx.log_metric("spectral.sigma", sigma, label)
        if not self.config.eps:
            return scores
        return Detection(scores, top_share(scores, data.labels, 1.5 * self.config.eps))


@hookimpl
def register_detectors(register):
    register(Spectral)
