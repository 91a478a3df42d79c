"""SCAn, Statistical Contamination Analyzer (Tang, Wang, Tang & Zhang, USENIX Security 2021): data level,
reads the model trained on the set and the defender's clean share.

A clean class's representations are one identity vector plus variation shared by all classes; a class
that also holds poisoned rows (other classes' images carrying the trigger) is a mixture of two
identities. SCAn models a representation as ``r = mu_class + e`` with ``mu ~ N(0, Su)`` and
``e ~ N(0, Se)`` (``nadbench.toolkit.robust``):

1. global model: ``Su`` and ``Se`` estimated by EM on the clean share's representations;
2. untangling, per class of the inspected set: its rows split into two subgroups sharing ``Se``
   (hard-assignment EM from a random split), and ``J``, the log-likelihood ratio of "two subgroups"
   against "one identity" (the authors' ``calc_test``);
3. decision: each class's anomaly index ``J* = (J - median) / (1.4826 MAD)`` over the classes; a class
   with ``J* > e^2`` is contaminated, and its subgroup that holds fewer of the clean share's rows (the
   clean share's rows assigned by the same split) is flagged.

Score (the authors give none per row): the class's ``J*`` plus the row's posterior probability of
belonging to its class's suspicious subgroup (in [0, 1], the logistic of the log-likelihood ratio of the
two subgroup Gaussians, which the split's own rule thresholds at 1/2). Classes rank by ``J*``, the
authors' statistic of contamination, and rows within a class by how clearly they belong to the
subgroup the decision flags; the decision is a cut of that order inside each flagged class. ``J`` is
logged per class (``scan.j``, step = the class), ``J*`` as ``scan.index``.

Settings of the official code (TDteach/Demon-in-the-Variant, ``pysrc/SCAn.py``; ``msrc/SCAn.m``): EM
until the covariances change by less than 1e-2 or 100 iterations (the ports in BackdoorBench and
vtu81/backdoor-toolbox: 1e-5), the untangling split until no row moves or 100 iterations, the
threshold ``e^2`` on ``J*`` (BackdoorBench's; backdoor-toolbox uses ``e``; the official code stops at
``J*``). The official code's global model reads a random 10 % of the rows it knows to be clean; here, as
in both ports, the clean share. The ports tell the suspicious subgroup by where the clean rows they
append to the inspected set fall; the engine mixes the clean share into the inspected set without
saying which rows, so here the clean share's rows are assigned by the split's rule.
"""
from dataclasses import dataclass

import numpy as np
import torch

from nadbench import Detection, Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.features import by_class, penultimate
from nadbench.toolkit.robust import (anomaly_index, as_array, distance, global_covariances, sigmoid, two_subgroups,
                                     untangling_statistic)


@dataclass(frozen=True)
class ScanConfig:
    threshold: float = param(float(np.exp(2)), "a class whose anomaly index J* exceeds this is contaminated",
                             min=0.0)
    tol: float = param(1e-2, "the global model's EM stops once its covariances change by less than this",
                       min=0.0, min_exclusive=True)


def untangle(x, reference, su, se, precision, rng):
    """One class's (globally centred) rows ``x`` and its rows of the clean share: (J, each row's posterior
    of belonging to the suspicious subgroup, the rows the split puts in it)."""
    first, m1, m2 = two_subgroups(x, precision, rng)
    j = untangling_statistic(x, su, se, precision, first, m1, m2)
    if first.all() or not first.any():
        return j, np.zeros(len(x)), np.zeros(len(x), dtype=bool)  # one identity: nothing suspicious
    # The suspicious subgroup holds fewer of the clean share's rows (ties: the smaller subgroup).
    clean_first = int((distance(reference, m1, precision) < distance(reference, m2, precision)).sum())
    clean_second = len(reference) - clean_first
    first_suspicious = clean_first < clean_second or (clean_first == clean_second and first.sum() <= (~first).sum())
    clean_mean, suspect_mean = (m2, m1) if first_suspicious else (m1, m2)
    posterior = sigmoid((distance(x, clean_mean, precision) - distance(x, suspect_mean, precision)) / 2)
    return j, posterior, first == first_suspicious


class Scan(Detector):
    name = "scan"
    Config = ScanConfig
    level = "data"
    description = "global class model on the clean share, two-subgroup untangling per class; J* > e^2 contaminated"
    sources = (Source(paper="Tang, Wang, Tang & Zhang, Demon in the Variant: Statistical Analysis of DNNs for "
                            "Robust Backdoor Contamination Detection, USENIX Security 2021",
                      repo="TDteach/Demon-in-the-Variant", path="pysrc/SCAn.py",
                      commit="2da39427d6efd0488a4f4cfa8b769793511b0b70",
                      backdoorbench="config/detection/scan/cifar10.yaml"),
               Source(paper="Qi, Xie, Wang, Panda & Mittal, Towards A Proactive ML Approach for Detecting Backdoor "
                            "Poison Samples, USENIX Security 2023 (SCAn's per-row decision, as its toolbox runs it)",
                      repo="vtu81/backdoor-toolbox", path="cleansers_tool_box/scan.py",
                      commit="9d4d909f25df481dba12b8e8c20c0812b6b1910b"))
    deviations = (
        Deviation("anomaly index", ours="one-sided: J* > threshold", theirs="two-sided: |J*| > threshold",
                  bb="two-sided", why="a class whose J is far below the others' is one identity, not a mixture"),
        Deviation("per-row score", ours="J* of the class plus the posterior of the suspicious subgroup",
                  theirs="none: a flagged class's suspicious subgroup is removed",
                  why="the engine ranks rows (AUROC, TPR at a false-positive rate)"),
    )

    def detect(self, data, clean, model, ctx):
        if len(clean) == 0:
            raise ValueError("SCAn estimates its global model on the clean share: it needs a clean share")
        if len(data) == 0:
            return Detection(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        features = as_array(penultimate(model, data.images, ctx.classifier_layer))
        reference = as_array(penultimate(model, clean.images, ctx.classifier_layer))
        labels, reference_labels = data.labels.cpu().numpy(), clean.labels.cpu().numpy()
        su, se = global_covariances(reference, reference_labels, tol=self.config.tol)
        precision = np.linalg.pinv(se)
        centre = features.mean(0)
        x, reference = features - centre, reference - centre
        rng = np.random.default_rng(ctx.seed)
        classes = by_class(data.labels.cpu())
        j, posterior, suspicious = {}, np.zeros(len(data)), np.zeros(len(data), dtype=bool)
        for label, rows in classes.items():
            rows = rows.numpy()
            j[label], posterior[rows], suspicious[rows] = untangle(
                x[rows], reference[reference_labels == label], su, se, precision, rng)
        index = dict(zip(j, anomaly_index(np.array(list(j.values())))))
        scores = np.zeros(len(data))
        for label, rows in classes.items():
            scores[rows.numpy()] = index[label] + posterior[rows.numpy()]
            ctx.log_metric("scan.j", j[label], label)
            ctx.log_metric("scan.index", float(index[label]), label)
        contaminated = np.array([index[int(c)] > self.config.threshold for c in labels], dtype=bool)
        return Detection(torch.from_numpy(scores), torch.from_numpy(suspicious & contaminated))


@hookimpl
def register_detectors(register):
    register(Scan)
