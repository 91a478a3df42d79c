"""SPECTRE (Hayase, Kong, Somani & Oh, ICML 2021): data level, reads the model trained on the set.

Spectral Signatures look for the poisoned rows of a class along its direction of largest variance;
SPECTRE first whitens the class's representations with a *robust* estimate of the clean rows'
covariance, so that a direction in which only the poisoned rows vary stands out even when it is not
the largest, then scores each row by its QUantum Entropy (QUE) score ``x' M x`` with
``M = exp(alpha (C - I) / (||C||_2 - 1)) / tr(...)`` (``C`` the covariance of the whitened rows): a
soft mix between the whitened norm (``alpha = 0``) and the top whitened direction (large ``alpha``).

Per class (``nadbench.toolkit.robust``): the representations (the classifier layer's inputs) are
projected on their top ``dims`` principal directions; for each ``k`` of the authors' grid (the squares
1, 4, 9, ... up to that dimension) the top ``k`` are whitened by a robust covariance estimated on them
(none for k = 1), the rows get their QUE scores and the ``1.5 eps`` highest are set aside; the ``k``
kept is the one whose remaining rows leave the largest QUE statistic (the mean QUE score of all rows
whitened by the remaining ones' covariance, in all ``dims`` directions). ``eps`` is the share of a
class assumed poisoned; the robust estimate may set aside up to ``2 eps`` of the rows, as the
authors' filter may.

Settings of the official code (SewoongLab/spectre-defense, ``quantum_filters.jl``, ``run_filters.jl``):
PCA to 100 dimensions (here at most the features' dimension), the grid of squares, alpha = 4, the
robust estimate removing at most ``2 eps`` rows and the decision ``1.5 eps``; ``eps`` there is the
true number of poisoned rows of the target class (an oracle), here ``eps`` = 10 % of each class.

Score and classes. The authors run SPECTRE on the target class, which they know. The engine ranks
all rows together, so classes must be told apart: each class's QUE statistic at its kept ``k`` is
the method's measure of how far the class departs from one robustly-estimated Gaussian (BackdoorBench
names the class with the largest one as the target). A row's score is its class's statistic plus its
QUE score mapped into [0, 1) (``tau / (1 + tau)``): classes rank by their statistic, rows within a
class by their QUE score. The statistic is logged per class (``spectre.que``, step = the class).
Decision (``Detection.flagged``): the authors' removal, the ``1.5 eps`` highest QUE scores, in the
class with the largest statistic (the target the method names). BackdoorBench removes them in every
class.

The robust covariance. The authors' filter (``dkk17.jl``, Diakonikolas et al. 2017) repeatedly
whitens the rows, finds the top eigenvector of the covariance of their outer products (a d^2 x d^2
operator) and drops the rows most extreme along it, a few rows per round, up to ``2 eps`` rows: one
eigenproblem per round, for each class and each k, which on a CPU costs several times what the
estimator used here does. Here scikit-learn's Minimum Covariance Determinant estimator (FastMCD),
keeping ``1 - 2 eps`` of the rows, after its reweighting step, gives the rows the covariance is
estimated on: an affine-equivariant robust estimate, from a maintained library, that tolerates up to
half of the rows being outliers. Both assume the poisoned rows are a minority of their class: where an
all-to-one attack poisons a tenth of a set, its target class is about half poisoned, and the robust
estimate may fit either half; the class statistic still sets such a class apart when classes hold
enough rows for the noise of its estimate, in up to ``dims`` directions, to stay below it.
"""
from dataclasses import dataclass

import numpy as np
import torch

from nadbench import Detection, Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.features import by_class, penultimate
from nadbench.toolkit.robust import (as_array, inverse_sqrt, principal_components, que_scores, que_statistic, rank,
                                     robust_rows)


@dataclass(frozen=True)
class SpectreConfig:
    eps: float = param(0.1, "the share of a class assumed poisoned: the robust covariance may set aside 2 x eps "
                            "of its rows, the decision removes 1.5 x eps", min=0.0, max=0.25, min_exclusive=True)
    dims: int = param(100, "principal directions kept (at most the features' dimension); k runs over the "
                           "squares up to it", min=1)
    alpha: float = param(4.0, "QUE exponent: 0 scores the whitened norm, large the top whitened direction",
                         min=0.0)


def grid(top: int) -> list[int]:
    """The authors' k: the squares 1, 4, 9, ... up to ``top``, and ``top``."""
    return sorted({i * i for i in range(1, int(np.sqrt(top)) + 1)} | {top})


def filter_class(x: np.ndarray, cfg: SpectreConfig, seed: int) -> tuple[np.ndarray, float, np.ndarray]:
    """One class's rows ``x`` (N, D): (their QUE scores at the kept k, that k's QUE statistic, the rows
    the authors remove)."""
    n = len(x)
    eps = max(1, round(cfg.eps * n))
    keep = 1 - 2 * eps / n
    # FastMCD's subset holds int(keep * n) rows, and needs more rows than directions.
    top = min(cfg.dims, rank(x), int(keep * n) - 1)
    if top < 1:
        return np.zeros(n), 0.0, np.zeros(n, dtype=bool)
    projected = principal_components(x, top)
    best = (-np.inf, None, None)
    for k in grid(top):
        p = projected[:, :k]
        if k > 1:
            p = p @ inverse_sqrt(np.cov(p[robust_rows(p, keep, seed)], rowvar=False, bias=True))
        tau = que_scores(p, cfg.alpha)
        removed = np.zeros(n, dtype=bool)
        removed[np.argsort(-tau, kind="stable")[:round(1.5 * eps)]] = True
        rest = np.cov(projected[~removed], rowvar=False).reshape(top, top)
        statistic = que_statistic(projected @ inverse_sqrt(rest), cfg.alpha)
        if statistic > best[0]:
            best = (statistic, tau, removed)
    statistic, tau, removed = best
    return tau, statistic, removed


class Spectre(Detector):
    name = "spectre"
    Config = SpectreConfig
    level = "data"
    description = "per class, robust whitening (MCD) then QUantum Entropy scores; remove 1.5 x eps in the top class"
    sources = (Source(paper="Hayase, Kong, Somani & Oh, SPECTRE: Defending Against Backdoor Attacks Using "
                            "Robust Statistics, ICML 2021",
                      repo="SewoongLab/spectre-defense", path="quantum_filters.jl",
                      commit="ccf594a8ae39fd5c6a077d8696efe19888055a1e",
                      backdoorbench="config/detection/spectre/cifar10.yaml"),)
    deviations = (
        Deviation("robust covariance", ours="scikit-learn's MinCovDet (FastMCD) keeping 1 - 2 eps of the rows",
                  theirs="the DKK17 filter (dkk17.jl), removing at most 2 eps rows",
                  bb="a Python port of the filter that stops once no row is extreme (1 - i/n in the tail test)",
                  why="a maintained robust estimator, several times cheaper on a CPU than the filter's eigenproblems"),
        Deviation("eps", ours="10 % of each class", theirs="the true number of poisoned rows of the target class",
                  bb="1 % of the whole set per class, at most a third of the class (a tenth under 500 rows)",
                  why="a defender does not know how many rows are poisoned"),
        Deviation("classes", ours="every class; rows rank by their class's QUE statistic, then their QUE score; "
                                  "the decision removes 1.5 eps in the class of largest statistic",
                  theirs="the known target class only",
                  bb="every class, 1.5 eps removed in each; the target reported is the largest statistic's",
                  why="a defender does not know the target class; the engine ranks all rows together"),
        Deviation("representation", ours="the classifier layer's inputs (pooled last features)",
                  theirs="a flattened intermediate feature map (ResNet-32's 14th block, ResNet-18's 6th)",
                  bb="a layer named on the command line (--target_layer)",
                  why="a layer every model declares (ModelSpec.classifier_layer)"),
    )

    def detect(self, data, clean, model, ctx):
        if len(data) == 0:
            return Detection(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        features = as_array(penultimate(model, data.images, ctx.classifier_layer))
        scores = np.zeros(len(data))
        removed = np.zeros(len(data), dtype=bool)
        statistics = {}
        for label, rows in by_class(data.labels.cpu()).items():
            rows = rows.numpy()
            tau, statistics[label], out = filter_class(features[rows], self.config, ctx.seed)
            scores[rows] = statistics[label] + tau / (1 + tau)
            removed[rows] = out
            ctx.log_metric("spectre.que", statistics[label], label)
        target = max(statistics, key=statistics.get)
        flagged = torch.from_numpy(removed & (data.labels.cpu().numpy() == target))
        return Detection(torch.from_numpy(scores), flagged)


@hookimpl
def register_detectors(register):
    register(Spectre)
