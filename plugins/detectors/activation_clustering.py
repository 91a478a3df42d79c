"""Activation Clustering, AC (Chen et al., SafeAI@AAAI 2019): data level, reads the model trained on the set.

A model classifies a poisoned row as its (target) label for another reason than the clean rows of that
label, the trigger, so the last hidden layer's activations of a poisoned class split into two groups.
Per class, the activations (here the inputs of the classifier layer) are reduced to 10 dimensions
(PCA, the default of the authors' implementation in ART; the paper and BackdoorBench use FastICA:
``reduce=ica``), and 2-means splits them. The analysis then decides which split is a poisoned one;
the paper's relative-size analysis (the default): the smaller cluster is poisoned when it holds less
than 35 % of its class; ``silhouette`` also asks that the split fits (mean silhouette above 0.1);
``smaller`` flags the smaller cluster of every class (ART's default). Thresholds are ART's. That
decision is this detector's own (``Detection.flagged``). Each class's smaller-cluster share and
silhouette are logged (``ac.share``, ``ac.silhouette``, step = the class).

The score. The authors give a decision, not a score; AUROC and the engine's threshold need one per row.
A row's score is its signed distance, in its class's reduced space, to the boundary between the two
clusters (the hyperplane halfway between the centres, where 2-means assigns), positive on the smaller
cluster's side. It is the continuous form of what the analysis suspects of a row, membership of the
smaller cluster: positive exactly for the rows 2-means put there, the higher the deeper inside, and
comparable between classes (each class's reduced space is centred on its rows). The analysis's own quantities
(the cluster's share, the silhouette) are one value per cluster: they cannot rank the rows of a cluster,
and a threshold on the clean share's scores could not fall between them. Like the decision, the score
trusts the method's assumption that the poisoned rows are the smaller part of their class: where they
are the larger, the clean rows of that class are the ones that score high.

Settings: 10 components, PCA (ART's ``ActivationDefence`` default; with ``reduce=ica``, FastICA with ART's
iteration limit, 1000, and tolerance, 0.005), k = 2 with 10 k-means++ starts (scikit-learn's default when
ART was written; with today's one start, a class's split changes from seed to seed). FastICA starts from
a random unmixing matrix, and on the suite's BadNets fixture its split of the target class changed with
the seed (tests/test_detectors_data_a.py); PCA has no random start. Exclusionary
reclassification (retrain without each suspect cluster) is not offered: a data detector here scores
from the one model the engine trained.
"""
from dataclasses import dataclass

import torch

from nadbench import Detection, Detector, Deviation, Source, hookimpl, param
from nadbench.toolkit.clusters import reduce, two_means
from nadbench.toolkit.features import as_rows, by_class, penultimate

ANALYSES = ("relative-size", "silhouette", "smaller")


@dataclass(frozen=True)
class ACConfig:
    dims: int = param(10, "components each class's activations are reduced to", min=1, max=4096)
    reduce: str = param("pca", "the reduction: PCA (ART's default) or FastICA (the paper, BackdoorBench)",
                        choices=("ica", "pca"))
    analysis: str = param("relative-size", "which clusters are poisoned: the smaller one below size_threshold of its "
                                           "class; also with a mean silhouette above silhouette_threshold; or the "
                                           "smaller one of every class", choices=ANALYSES)
    size_threshold: float = param(0.35, "the share of its class below which the smaller cluster is poisoned",
                                  min=0.0, max=0.5)
    silhouette_threshold: float = param(0.1, "the mean silhouette above which a split counts (analysis=silhouette)",
                                        min=-1.0, max=1.0)
    n_init: int = param(10, "k-means++ starts per class (the split of least inertia is kept)", min=1, max=100)


class ActivationClustering(Detector):
    name = "ac"
    Config = ACConfig
    level = "data"
    description = "per class, PCA to 10 dimensions and 2-means; the smaller cluster below 35 % of its class is poisoned"
    sources = (Source(paper="Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy & Srivastava, Detecting Backdoor "
                            "Attacks on Deep Neural Networks by Activation Clustering, SafeAI@AAAI 2019",
                      repo="Trusted-AI/adversarial-robustness-toolbox",
                      path="art/defences/detector/poison/activation_defence.py",
                      commit="23539e2c06045d78594b6b6da533eed57967e410",
                      backdoorbench="config/detection/ac/cifar10.yaml"),)
    deviations = (Deviation("score", ours="signed distance to the 2-means boundary, + on the smaller cluster's side",
                            theirs="none: a decision per row", bb="none: the decision's TPR and FPR",
                            why="AUROC and the engine's threshold need a score per row"),
                  Deviation("analysis", ours="relative size: the smaller cluster, when below 35 % of its class",
                            theirs="ART's default: the smaller cluster of every class (relative size an option)",
                            bb="the smaller cluster, when below 35 % of its class",
                            why="the paper's analysis; 'smaller' flags a cluster in every class, poisoned or not"),
                  Deviation("k-means starts", ours="10", theirs="scikit-learn's default (10 then, 1 since 1.4)",
                            bb="scikit-learn's default",
                            why="one k-means++ start splits a class differently from seed to seed"),
                  Deviation("reduction", ours="PCA to 10 (ART's ActivationDefence default)",
                            theirs="the paper: FastICA to 10 (ART's cluster_activations helper too)",
                            bb="FastICA to 10, unit variance",
                            why="the authors' implementation's default; FastICA's random start changed the target "
                                "class's split from seed to seed on the suite's fixture (reduce=ica gives it)"),
                  Deviation("exclusionary reclassification", ours="not offered",
                            theirs="optional in ART (ex_re_threshold)", bb="not offered",
                            why="it retrains a model without each suspect cluster; a data detector scores one model"))

    def detect(self, data, clean, model, ctx):
        cfg = self.config
        features = as_rows(penultimate(model, data.images, ctx.classifier_layer))
        scores = torch.zeros(len(data), dtype=torch.float64)
        flagged = torch.zeros(len(data), dtype=torch.bool)
        for label, rows in by_class(data.labels.cpu()).items():
            split = two_means(reduce(features[rows], cfg.dims, cfg.reduce, ctx.seed), ctx.seed, cfg.n_init)
            scores[rows] = split.margin
            ctx.log_metric("ac.share", split.share, label)
            ctx.log_metric("ac.silhouette", split.silhouette, label)
            poisoned = {"smaller": True,
                        "relative-size": split.share < cfg.size_threshold,
                        "silhouette": split.share < cfg.size_threshold
                        and split.silhouette > cfg.silhouette_threshold}[cfg.analysis]
            if poisoned:
                flagged[rows[split.smaller]] = True
        return Detection(scores, flagged)


@hookimpl
def register_detectors(register):
    register(ActivationClustering)
