"""The input-level detectors STRIP and SCALE-UP (``nadbench.plugins.detectors.strip``, ``.scale_up``) and
their toolkit (``nadbench.toolkit.perturb``): each one's mechanism on a toy model with a planted trigger,
its effect on the BadNets fixture screened the way the engine screens inputs, and scores that do not
depend on the rest of their batch."""
import copy
import dataclasses
import math
import types

import pytest
import torch
from torch import nn

from nadbench import DetectionContext, Split
from nadbench.engine.detecting import detection_metrics, screen_inputs
from nadbench.engine.registry import get_registry
from nadbench.toolkit.perturb import amplify, draw, entropy, superimpose

CHECKER = ((torch.arange(3)[:, None] + torch.arange(3)[None]) % 2 == 0).float()  # the toy trigger, 3x3


def detector(name: str, **config):
    cls = get_registry().get("detectors", name)
    return cls(cls.Config(**config))


# ------------------------------------------------------------------------------ toy model
class Planted(nn.Module):
    """A toy classifier with a planted backdoor: the checkerboard in the bottom-right corner adds a
    large logit to class 0 whatever else the image holds (also when another image is added to it, or
    its pixels amplified). Otherwise a fixed random projection of the centred image decides, with
    moderate confidence; a bright image (mean near 1, as amplified ones become) leans to class 1."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(10, 3 * 32 * 32, generator=g) * 0.05, requires_grad=False)

    def forward(self, x):
        logits = (x - 0.5).flatten(1) @ self.w.T
        match = (x[:, :, -3:, -3:] * (2 * CHECKER - 1)).sum((2, 3)).mean(1)  # 5 on the trigger, ~0.5 on noise
        bonus = torch.zeros_like(logits)
        bonus[:, 0] = 30 * torch.relu(match - 3)
        bonus[:, 1] = 10 * (x.mean((1, 2, 3)) - 0.5)
        return logits + bonus


def toy(n: int = 60, seed: int = 0):
    """(model, clean share, inputs, triggered): ``n`` noise images, ``n`` of them again with the trigger."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (3 * n, 3, 32, 32), dtype=torch.uint8, generator=g)
    clean, inputs = Split(images[:n], torch.zeros(n, dtype=torch.long)), images[n:].clone()
    inputs[n:, :, -3:, -3:] = (CHECKER * 255).to(torch.uint8)
    ctx = DetectionContext(device=torch.device("cpu"), num_classes=10, seed=seed, progress=False)
    return Planted().eval(), clean, inputs, torch.arange(2 * n) >= n, ctx


def auroc(scores, truth) -> float:
    return detection_metrics(scores, truth)["auroc"]


def test_perturbations():
    x = torch.full((2, 3, 4, 4), 0.75)
    assert float(superimpose(x, x[0]).max()) == 1.5  # the authors' sum: not clipped
    assert float(amplify(x, 3).max()) == 1.0 and torch.equal(amplify(x, 1), x)
    assert entropy(torch.zeros(1, 10)).item() == pytest.approx(math.log2(10))
    assert entropy(torch.tensor([[0.0, -1e4, 50.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(draw(10, 4, seed=3), draw(10, 4, seed=3)) and len(set(draw(10, 10, seed=3).tolist())) == 10
    assert len(draw(3, 8, seed=0)) == 8  # a pool smaller than the draw: with replacement


def test_strip_mechanism_low_entropy_under_overlays_is_the_trigger():
    model, clean, inputs, triggered, ctx = toy()
    strip = detector("strip")
    strip.prepare(model, clean, ctx)
    scores = strip.score(model, inputs)
    assert strip.overlays.shape == (100, 3, 32, 32)  # the authors' N, drawn from the clean share
    assert auroc(scores, triggered) == 1.0
    assert float(-scores[triggered].max()) < 0.01 < float(-scores[~triggered].min())  # entropy, bits


def test_scale_up_mechanism_consistency_under_amplification_is_the_trigger():
    """Data-free, the triggered inputs keep their prediction at every factor (SPC 1), and so do the
    clean ones predicted as the class bright images lean to; standardised per predicted class
    (data-limited, the default), those clean ones fall back among their class."""
    model, clean, inputs, triggered, ctx = toy()
    free, limited = detector("scale-up", data_limited=False), detector("scale-up")
    free.prepare(model, clean, ctx)
    limited.prepare(model, clean, ctx)
    spc, z = free.score(model, inputs), limited.score(model, inputs)
    assert bool((spc[triggered] == 1).all()) and bool((spc[~triggered] == 1).any())
    assert set((spc * 11).round().tolist()) <= set(range(1, 12))  # the 11 factors, the first the input itself
    assert auroc(spc, triggered) < 0.98 and auroc(z, triggered) == 1.0
    own = limited.score(model, clean.images)  # the clean share's standardised SPC: mean 0 in every class
    predicted = model(clean.images.float() / 255).argmax(1)
    for c in predicted.unique():
        if int((predicted == c).sum()) > 1:
            assert float(own[predicted == c].mean()) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------ effect on the fixture
@pytest.fixture(scope="module")
def screened(badnets_detection):
    """50 clean and 50 triggered inputs of the fixture (in its shuffled order) and a seeded 80 of its
    clean share: each input and each clean image costs STRIP N forwards and SCALE-UP 11 (the engine
    scores the clean share for its threshold, data-limited SCALE-UP once more for its statistics), so
    the fixture's 600 inputs and 1,000 clean images do not fit the suite's budget."""
    from nadbench.training.subsets import limit

    f = badnets_detection
    rows = torch.cat([(~f.triggered).nonzero().flatten()[:50], f.triggered.nonzero().flatten()[:50]]).sort().values
    return types.SimpleNamespace(f=f, inputs=f.inputs[rows], triggered=f.triggered[rows],
                                 clean=limit(f.clean, 80, seed=1))


def screen(s, name: str, model, seed: int, **config) -> dict:
    out = screen_inputs(detector(name, **config), model, s.clean, s.inputs, dataclasses.replace(s.f.ctx, seed=seed))
    return detection_metrics(out.scores, s.triggered, out.flagged)


def test_the_effect_bound_fails_random_scores(screened):
    scores = torch.rand(len(screened.inputs), generator=torch.Generator().manual_seed(0))
    assert auroc(scores, screened.triggered) < 0.8


def test_strip_flags_badnets_inputs_not_a_clean_models(screened, effect_seed, record):
    # N = 10 overlays, not the authors' 100: the effect costs N x 180 forwards per model, and even the
    # smallest share that holds 100 distinct overlays costs 10,000 forwards per model at N = 100, over this
    # file's budget (at N = 100 with 100 + 100 inputs and a 200-image share: AUROC 1.0, clean model 0.47).
    bad = screen(screened, "strip", screened.f.model, effect_seed, overlays=10)
    clean = screen(screened, "strip", screened.f.clean_model, effect_seed, overlays=10)
    record(auroc=bad["auroc"], tpr=bad["tpr"], clean_model_auroc=clean["auroc"])
    assert bad["auroc"] >= 0.8     # seeds 0/1/2: 1.0, 1.0, 0.9996
    assert clean["auroc"] <= 0.65  # seeds 0/1/2: 0.449, 0.504, 0.45


def test_scale_up_flags_badnets_inputs_not_a_clean_models(screened, effect_seed, record):
    bad = screen(screened, "scale-up", screened.f.model, effect_seed)
    clean = screen(screened, "scale-up", screened.f.clean_model, effect_seed)
    record(auroc=bad["auroc"], tpr=bad["tpr"], clean_model_auroc=clean["auroc"])
    assert bad["auroc"] >= 0.8     # seeds 0/1/2: 0.959, 0.959, 0.959 (it draws nothing at random)
    assert clean["auroc"] <= 0.65  # seeds 0/1/2: 0.499, 0.499, 0.499


# ------------------------------------------------------------------------------ batch independence
@pytest.mark.parametrize("name, config", [("strip", {"overlays": 5}), ("scale-up", {"scales": (1, 3, 5, 7)})])
def test_scores_do_not_depend_on_the_batch(badnets_detection, name, config):
    """Permuting a batch permutes its scores, and a batch scored in two halves scores the same; the
    model, handed over in training mode, is run in eval mode and given back in training mode."""
    f = badnets_detection
    model = copy.deepcopy(f.model).train()
    det = detector(name, **config)
    det.prepare(model, f.clean.subset(torch.arange(0, 200, 8)), f.ctx)
    batch = f.inputs[:16]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    scores = det.score(model, batch)
    torch.testing.assert_close(det.score(model, batch[perm]), scores[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([det.score(model, batch[:5]), det.score(model, batch[5:])]), scores,
                               rtol=1e-5, atol=1e-5)
    assert model.training
