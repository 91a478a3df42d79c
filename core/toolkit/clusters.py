"""Per-class statistics of feature vectors, for the data detectors that look for the poisoned rows of a
class as a direction or a cluster of their own in the model's representations: the spectral score along
a class's top singular vector, a per-class top share, a dimensionality reduction, and a 2-means split
with the quantities the activation-clustering analysis reads (the smaller cluster, its share, the
silhouette) and a per-row margin.

Everything here works on one class's rows at a time, on the CPU in float64: the matrices are small
(rows x feature channels), scikit-learn needs NumPy, and the scores then rank the same on every device."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

def top_direction(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The top right singular vector of the centred rows of ``x`` (N, D) and its singular value: the
    direction along which the rows vary most."""
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return vh[0], float(s[0])


def spectral_scores(x: torch.Tensor, centred: bool = False) -> tuple[torch.Tensor, float]:
    """Each row's squared projection on the top singular vector of ``x``'s centred rows, and that
    vector's singular value. ``centred``: project the centred rows, ``((r - mean) . v)^2`` (a two-tailed
    outlier score); else the rows as they are, ``(r . v)^2``, which ranks the rows on the far side of the
    mean from the origin along ``v`` highest. Squaring keeps the order of ``|r . v|`` and makes the sign
    of ``v``, which an SVD leaves arbitrary, irrelevant."""
    if len(x) < 2:
        return torch.zeros(len(x), dtype=x.dtype), 0.0
    v, sigma = top_direction(x)
    return ((x - x.mean(0) if centred else x) @ v) ** 2, sigma


def top_share(scores: torch.Tensor, labels: torch.Tensor, share: float) -> torch.Tensor:
    """A bool mask flagging, within each label, the ``floor(share * n)`` highest-scoring of its ``n`` rows."""
    flagged = torch.zeros(len(scores), dtype=torch.bool)
    scores, labels = scores.cpu(), labels.cpu()
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        k = int(share * len(rows) + 1e-9)
        if k:
            flagged[rows[scores[rows].topk(k).indices]] = True
    return flagged


def reduce(x: torch.Tensor, dims: int, method: str = "ica", seed: int = 0) -> np.ndarray:
    """``x`` (N, D) reduced to ``dims`` components: ``"ica"`` (FastICA, unit-variance components) or
    ``"pca"``. Rows that cannot carry ``dims`` components (N <= dims or D <= dims) are only centred, as
    ART's ``cluster_activations`` does without reduction."""
    from sklearn.decomposition import PCA, FastICA

    a = x.numpy()
    if len(a) <= dims or a.shape[1] <= dims:
        return a - a.mean(0)
    if method == "pca":
        return PCA(n_components=dims, random_state=seed).fit_transform(a)
    if method != "ica":
        raise ValueError(f"unknown reduction {method!r}: valid: ica, pca")
    # ART's iteration limit and tolerance. A run that stops at the limit still gives components the
    # clustering can use, so its convergence warning is not shown to the user.
    ica = FastICA(n_components=dims, whiten="unit-variance", max_iter=1000, tol=0.005, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ica.fit_transform(a)


@dataclass
class TwoMeans:
    """A 2-means split of one class's (reduced) rows.

    ``smaller``: the rows of the smaller cluster (bool); ``share``: its share of the class;
    ``silhouette``: the split's mean silhouette (how well two clusters fit the rows, in [-1, 1]);
    ``margin``: each row's signed distance to the boundary between the two clusters (the hyperplane
    halfway between the centres, where 2-means assigns), positive on the smaller cluster's side."""

    smaller: torch.Tensor
    share: float
    silhouette: float
    margin: torch.Tensor


def two_means(z: np.ndarray, seed: int = 0, n_init: int = 10) -> TwoMeans:
    """k-means with k = 2 on the rows of ``z`` (best inertia of ``n_init`` k-means++ starts). Fewer than
    two distinct rows cannot be split: no row is then in a smaller cluster and every margin is 0."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(z)
    if n < 2 or len(np.unique(z, axis=0)) < 2:
        return TwoMeans(torch.zeros(n, dtype=torch.bool), 0.0, 0.0, torch.zeros(n, dtype=torch.float64))
    km = KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit(z)
    sizes = np.bincount(km.labels_, minlength=2)
    small = int(sizes.argmin())  # a tie names cluster 0: neither is smaller, and the share is 0.5
    toward = km.cluster_centers_[small] - km.cluster_centers_[1 - small]
    middle = km.cluster_centers_.mean(0)
    margin = (z - middle) @ (toward / np.linalg.norm(toward))
    return TwoMeans(smaller=torch.from_numpy(km.labels_ == small), share=float(sizes[small] / n),
                    silhouette=float(silhouette_score(z, km.labels_)), margin=torch.from_numpy(margin))
