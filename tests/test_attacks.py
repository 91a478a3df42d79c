"""BadNets' trigger and poisoning, and the ASR definition."""
import pytest
import torch
from torch import nn

from nadbench import Split
from nadbench.engine.registry import get_registry
from nadbench.training.evaluate import attack_success_rate, evaluate


def _data(n=200, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(n) % classes)


def test_badnets_trigger_replaces_only_the_corner():
    attack = get_registry().attack("badnets")()
    x = _data(4).images
    y = attack.apply_trigger(x)
    assert y.dtype == torch.uint8 and torch.equal(x, _data(4).images)  # input untouched
    assert torch.equal(y[..., :29, :], x[..., :29, :]) and torch.equal(y[..., :, :29], x[..., :, :29])
    expected = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(y[:, :, 29:, 29:], expected.expand(4, 3, 3, 3))


def test_badnets_poisons_ten_percent_dirty_label():
    attack = get_registry().attack("badnets").from_overrides({"target": "3"})
    train = _data(1000)
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(1))
    assert len(index) == 100 and len(set(index.tolist())) == 100
    assert (poisoned.labels[index] == 3).all()
    mask = torch.ones(1000, dtype=torch.bool)
    mask[index] = False
    assert torch.equal(poisoned.labels[mask], train.labels[mask])
    assert torch.equal(poisoned.images[mask], train.images[mask])
    assert torch.equal(poisoned.images[index], attack.apply_trigger(train.images[index]))
    again, index2 = attack.poison_train(train, torch.Generator().manual_seed(1))
    assert torch.equal(index, index2)  # seeded


class _Constant(nn.Module):
    """Predicts a fixed class, or the label encoded in pixel (0, 0, 0) when ``label_from_pixel``."""

    def __init__(self, cls=None):
        super().__init__()
        self.cls, self.w = cls, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        labels = (x[:, 0, 0, 0] * 255).round().long() if self.cls is None else torch.full((len(x),), self.cls)
        return nn.functional.one_hot(labels, 10).float() + self.w


def test_asr_counts_only_non_target_images():
    attack = get_registry().attack("badnets")()  # target 5
    test = _data(100)
    test.images[:, 0, 0, 0] = test.labels.to(torch.uint8)  # let the fake model read the true label
    triggered = attack.trigger_test(test)
    assert len(triggered) == 90 and not (triggered.labels == 5).any()
    assert attack_success_rate(_Constant(5), triggered, 5) == 1.0
    assert attack_success_rate(_Constant(None), triggered, 5) == 0.0  # always right: no success
    res = evaluate(_Constant(None), test, triggered, 5)
    assert res == {"acc": 1.0, "asr": 0.0, "ra": 1.0}  # ACC over the whole clean test set, target class included
    assert evaluate(_Constant(5), test, triggered, 5)["acc"] == pytest.approx(0.1)
