"""The data detectors Spectral Signatures (``spectral``) and Activation Clustering (``ac``): their mechanism on a
toy model whose penultimate features are pixels (a planted trigger direction), and their effect on the committed
BadNets fixture, run as the engine runs them."""
import dataclasses

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from nadbench import Detection, DetectionContext, Split
from nadbench.engine.detecting import detection_metrics, inspect_data
from nadbench.plugins.detectors.activation_clustering import ActivationClustering
from nadbench.plugins.detectors.spectral import Spectral
from nadbench.toolkit.clusters import two_means

D = 16  # the toy's feature channels


class Toy(nn.Module):
    """A classifier whose penultimate features (the inputs of ``fc``) are the first ``D`` pixel values."""

    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(D, classes)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :D])


def planted(poisoned_share=0.1, n=400, seed=0):
    """Two classes of ``n`` rows whose features are Gaussian noise, and a lone row of class 2. In class 1, a
    ``poisoned_share`` of the rows carries a trigger: its first four features at their maximum."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(2 * n + 1, 3, 32, 32, dtype=torch.uint8)
    flat = images.view(len(images), -1)
    flat[:, :D] = (128 + 32 * torch.randn(len(images), D, generator=g)).clamp(0, 255).round().to(torch.uint8)
    labels = torch.cat([torch.zeros(n), torch.ones(n), torch.full((1,), 2)]).long()
    poisoned = torch.zeros(len(images), dtype=torch.bool)
    poisoned[n:n + int(poisoned_share * n)] = True
    flat[poisoned, :4] = 255
    return Split(images, labels), poisoned


TOY_CTX = DetectionContext(device=torch.device("cpu"), num_classes=3, seed=0, classifier_layer="fc", progress=False)


def auroc_in(cls, scores, data, poisoned):
    rows = data.labels == cls
    return roc_auc_score(poisoned[rows].numpy(), scores[rows].numpy())


# ------------------------------------------------------------------------------ Spectral Signatures
def test_spectral_ranks_a_planted_minority_first_and_flags_one_and_a_half_eps_per_class():
    data, poisoned = planted(0.1)
    for centred in (False, True):
        out = Spectral(Spectral.Config(centred=centred)).detect(data, data.subset(slice(0, 0)), Toy(), TOY_CTX)
        assert isinstance(out, Detection) and out.scores.shape == (len(data),)
        assert auroc_in(1, out.scores, data, poisoned) > 0.99, centred
        # the authors' removal: the 1.5 x eps (15 %) highest of every class, which holds every poisoned row
        assert out.flagged[data.labels == 0].sum() == out.flagged[data.labels == 1].sum() == 60
        assert out.flagged[poisoned].all()
        assert out.scores[-1] == 0 and not out.flagged[-1]  # a lone row has no direction to stand out along
    assert isinstance(Spectral(Spectral.Config(eps=0.0)).detect(data, data, Toy(), TOY_CTX), torch.Tensor)


def test_spectral_scores_of_the_official_code_survive_a_poisoned_majority_the_papers_do_not():
    """When the poisoned rows are most of their class, the mean sits near them: the paper's centred score
    ranks the clean rows of that class as far out as the poisoned ones, while the official code's uncentred
    score still ranks the rows whose features are larger (the trigger's) first."""
    data, poisoned = planted(0.55)
    code = Spectral().detect(data, data, Toy(), TOY_CTX).scores
    paper = Spectral(Spectral.Config(centred=True)).detect(data, data, Toy(), TOY_CTX).scores
    assert auroc_in(1, code, data, poisoned) > 0.99
    assert auroc_in(1, paper, data, poisoned) < 0.6


# ------------------------------------------------------------------------------ Activation Clustering
def test_ac_splits_off_a_planted_minority_and_its_relative_size_flags_it_alone():
    """The toy's split is found with more k-means starts than the default 10: in the unit-variance ICA space a
    cluster of a tenth of the class lowers the inertia only a little more than a split of the noise does, and
    10 starts find it in about half of such draws (one start, scikit-learn's default today, in none of 20)."""
    data, poisoned = planted(0.1)
    ac = ActivationClustering(ActivationClustering.Config(n_init=50))
    out = ac.detect(data, data.subset(slice(0, 0)), Toy(), TOY_CTX)
    assert auroc_in(1, out.scores, data, poisoned) > 0.99
    assert torch.equal(out.flagged, poisoned)  # class 0's split is into near halves of noise: not below 35 %
    assert ((out.scores > 0) == poisoned)[data.labels == 1].all()  # the score's sign is the 2-means assignment
    assert out.scores[-1] == 0 and not out.flagged[-1]
    smaller = ActivationClustering(ActivationClustering.Config(n_init=50, analysis="smaller"))
    flagged = smaller.detect(data, data, Toy(), TOY_CTX).flagged
    assert flagged[data.labels == 0].any() and torch.equal(flagged[data.labels == 1], poisoned[data.labels == 1])


def test_two_means_margin_is_positive_exactly_on_the_smaller_cluster():
    g = torch.Generator().manual_seed(1)
    z = torch.cat([torch.randn(90, 2, generator=g), torch.randn(30, 2, generator=g) + 4]).double().numpy()
    split = two_means(z, seed=0)
    assert split.share == pytest.approx(0.25) and split.silhouette > 0.5
    assert torch.equal(split.smaller, split.margin > 0) and split.smaller[90:].all()
    assert two_means(z[:1]).margin.tolist() == [0.0] and not two_means(z[:1]).smaller.any()


# ------------------------------------------------------------------------------ effect on the BadNets fixture
def fixture_subset(f):
    """A fixed half of the fixture's 4,000 rows, for time, with a clean share of 5 % of them (100 images,
    as a grid's share is of its training set: the engine mixes the share into what a detector inspects)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(f.data), generator=g)[:2000].sort().values
    share = torch.randperm(len(f.clean), generator=g)[:100].sort().values
    return f.data.subset(rows), f.poisoned[rows], f.clean.subset(share)


def detect_on_fixture(detector, f, seed):
    data, truth, clean = fixture_subset(f)
    detected = inspect_data(detector, data, clean, f.model, dataclasses.replace(f.ctx, seed=seed))
    return detection_metrics(detected.scores, truth, detected.flagged)


def test_spectral_finds_badnets_rows_on_the_fixture(badnets_detection, record, effect_seed):
    """The fixture's target class is about half poisoned (10 % all-to-one), outside the paper's assumption
    of a minority; the official code's uncentred score still ranks the poisoned rows above most clean ones,
    since the trigger's features are the larger. The own decision (15 % of every class) recalls about a
    third of the poisoned rows at a false-positive rate near 13 %."""
    m = detect_on_fixture(Spectral(), badnets_detection, effect_seed)
    record(auroc=m["auroc"], tpr=m["tpr"], precision=m["precision"], recall=m["recall"], fpr=m["fpr"])
    # seeds 0/1/2: 0.843/0.843/0.843 (nothing random: the seed only orders the rows); random scores: 0.5
    assert m["auroc"] >= 0.8


def test_ac_finds_badnets_rows_on_the_fixture(badnets_detection, record, effect_seed):
    """AC assumes the poison is the smaller part of its class (relative size below 35 %); at the
    fixture's 10 % all-to-one it is more than half of the target class, so the authors' decision flags
    none of it (recall 0). The score still ranks the poisoned rows high: PCA's 2-means split of the
    target class puts them on the smaller cluster's side. With FastICA (``reduce=ica``, the paper's) the
    split turned with the seed here (AUROC 0.49 / 0.41 / 0.86 on a third of the poisoned rows, 0.24 /
    0.23 / 0.23 on all of them)."""
    m = detect_on_fixture(ActivationClustering(), badnets_detection, effect_seed)
    record(auroc=m["auroc"], tpr=m["tpr"], precision=m["precision"], recall=m["recall"], fpr=m["fpr"])
    # seeds 0/1/2: 0.857/0.856/0.858; random scores: 0.5
    assert m["auroc"] >= 0.8
