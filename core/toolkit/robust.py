"""Robust and per-class statistics of feature vectors, for the data detectors built on a Gaussian model
of each class's representations: SPECTRE's robust whitening and QUantum Entropy (QUE) scores, and
SCAn's two-level model (a global between-/within-class covariance estimated by EM, one class untangled
into two subgroups, and the likelihood-ratio statistic that says whether it needed two), with the
median-absolute-deviation anomaly index both compare classes by.

Everything works on NumPy float64 arrays on the CPU (rows x feature channels, small): scikit-learn needs
NumPy, and the statistics then come out the same on every device."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .features import as_rows


def as_array(features: torch.Tensor) -> np.ndarray:
    """(N, ...) features as a float64 (N, D) NumPy matrix."""
    return as_rows(features).numpy()


# ------------------------------------------------------------------------------ robust whitening, QUE
def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """The centred rows of ``x`` (N, D) projected on their top ``k`` principal directions (N, k)."""
    centred = x - x.mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:k].T


def rank(x: np.ndarray, rtol: float = 1e-7) -> int:
    """The numerical rank of ``x``'s centred rows: how many directions whitening can use (a ReLU
    network's pooled features often have channels that never fire)."""
    if len(x) < 2:
        return 0
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    return int((s > rtol * s[0]).sum()) if s[0] > 0 else 0


def inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric inverse square root of a covariance matrix (eigenvalues floored, so that a
    nearly flat direction whitens to a large but finite scale)."""
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
    return (v / np.sqrt(w)) @ v.T


def robust_rows(x: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """A bool mask of the rows of ``x`` (N, k) a robust covariance estimate rests on: the support of
    scikit-learn's Minimum Covariance Determinant estimator (FastMCD) whose raw subset holds the share
    ``keep`` of the rows, after its reweighting step."""
    from sklearn.covariance import MinCovDet

    with warnings.catch_warnings():
        # FastMCD warns when a subset's covariance is singular or a C-step raises the determinant
        # (float round-off); it recovers from both.
        warnings.simplefilter("ignore")
        return MinCovDet(support_fraction=keep, random_state=seed).fit(x).support_


def que_weights(cov: np.ndarray, alpha: float) -> np.ndarray:
    """SPECTRE's QUE matrix for a covariance of whitened rows: ``exp(alpha (C - I) / (||C||_2 - 1))``
    with unit trace. ``alpha`` = 0 weighs every direction alike (the squared norm); large ``alpha``
    keeps only the direction of largest variance (the spectral signature)."""
    w, v = np.linalg.eigh(cov)
    gap = float(w.max()) - 1
    # A covariance no larger than the identity's leaves nothing to amplify: weigh directions alike.
    m = (v * np.exp(alpha * (w - 1) / gap)) @ v.T if gap > 1e-12 else np.eye(len(cov))
    return m / np.trace(m)


def que_scores(white: np.ndarray, alpha: float) -> np.ndarray:
    """Each row's QUE score ``x' M x`` (M from the covariance of the rows ``white``, already whitened)."""
    if white.shape[1] == 1:
        return white[:, 0] ** 2
    m = que_weights(np.cov(white, rowvar=False), alpha)
    return np.einsum("ij,jk,ik->i", white, m, white)


def que_statistic(white: np.ndarray, alpha: float) -> float:
    """The QUE statistic of whitened rows, ``tr(C M) / tr(M)``: their mean QUE score, near 1 when they
    follow the covariance they were whitened by, large when some direction holds excess variance."""
    cov = np.cov(white, rowvar=False).reshape(white.shape[1], white.shape[1])
    m = que_weights(cov, alpha)
    return float(np.trace(cov @ m) / np.trace(m))


# ------------------------------------------------------------------------------ SCAn's two-level model
def global_covariances(x: np.ndarray, labels: np.ndarray, tol: float = 1e-2,
                       iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """SCAn's global model of clean representations: a row is its class's identity vector plus a
    within-class variation, ``r = mu_class + e``, with ``mu ~ N(0, Su)`` and ``e ~ N(0, Se)``.
    Returns ``(Su, Se)`` by EM: each class's identity vector is estimated from its rows under the
    current covariances, then the covariances from those estimates; until their change (Frobenius
    norms, summed) is below ``tol``, or ``iterations``."""
    x = x - x.mean(0)
    classes = np.unique(labels)
    index = np.searchsorted(classes, labels)
    sums = np.stack([x[labels == c].sum(0) for c in classes])
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    u = (sums / counts[:, None])[index]
    su, se = np.cov(u, rowvar=False), np.cov(x - u, rowvar=False)
    for _ in range(iterations):
        f = np.linalg.pinv(se)
        means = np.stack([se @ np.linalg.pinv(n * su + se) @ su @ f @ s for n, s in zip(counts, sums)])
        u = means[index]
        su_next, se_next = np.cov(u, rowvar=False), np.cov(x - u, rowvar=False)
        change = np.linalg.norm(su_next - su) + np.linalg.norm(se_next - se)
        su, se = su_next, se_next
        if change < tol:
            break
    return su, se


def two_subgroups(x: np.ndarray, precision: np.ndarray, rng: np.random.Generator,
                  iterations: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SCAn's untangling of one class's (globally centred) rows ``x`` into two subgroups sharing the
    within-class covariance (``precision`` its inverse): from a random half/half assignment, each row
    joins the subgroup whose mean is nearer in that metric, until no row moves. Returns (in the first
    subgroup, its mean, the second's mean); a subgroup that empties leaves the other holding every row."""
    n = len(x)
    first = rng.random(n) >= 0.5
    if n > 1 and first.all():
        first[0] = False
    if n > 1 and not first.any():
        first[0] = True
    for _ in range(iterations):
        if first.all() or not first.any():
            break
        m1, m2 = x[first].mean(0), x[~first].mean(0)
        nearer = distance(x, m1, precision) < distance(x, m2, precision)
        moved = (nearer != first).any() and (nearer != ~first).any()
        first = nearer
        if not moved:
            break
    mean = x.mean(0)
    m1 = x[first].mean(0) if first.any() else mean
    m2 = x[~first].mean(0) if (~first).any() else mean
    return first, m1, m2


def distance(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Each row's squared Mahalanobis distance to ``mean`` under ``precision``."""
    d = x - mean
    return np.einsum("ij,jk,ik->i", d, precision, d)


def untangling_statistic(x: np.ndarray, su: np.ndarray, se: np.ndarray, precision: np.ndarray,
                         first: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> float:
    """SCAn's J for one class (the authors' ``calc_test``): the per-row log-likelihood ratio between the
    class as two subgroups (means ``m1``, ``m2``) and as one class under the global model, whose identity
    vector is estimated from its rows with ``(Su, Se)``. Large when the class is a mixture."""
    n = len(x)
    mu = se @ np.linalg.pinv(n * su + se) @ x.sum(0)
    fm = precision @ mu
    b1, b2 = mu @ fm - m1 @ precision @ m1, mu @ fm - m2 @ precision @ m2
    n1 = int(first.sum())
    own = np.where(first[:, None], mu - m1, mu - m2)
    return float((n1 * b1 + (n - n1) * b2 - 2 * np.einsum("ij,jk,ik->", x, precision, own)) / n)


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """``(v - median) / (1.4826 MAD)``: each value's deviation from the median in units of the median
    absolute deviation (scaled to a normal's standard deviation); signed, 0 where the MAD is 0."""
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / scale if scale > 0 else np.zeros_like(values)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large ``|x|``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))
