"""PGD, Trojan's trigger generation and stamping, CL's clean-label poisoning (tiny models only)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nadbench import AttackContext, ConfigError, DatasetSpec, Split
from nadbench.toolkit.adversarial import input_activations, last_linear, most_connected_inputs, neuron_trigger, pgd
from nadbench.training.models import Normalized
from nadbench.plugins.attacks.cl import four_corner_pattern
from nadbench.engine.registry import get_registry

SPEC = DatasetSpec(name="fake", load=lambda root: None, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)


def _tiny(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    return Normalized(net, SPEC.mean, SPEC.std).eval()


def _data(n=40, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % classes)


def _ctx(model, train, logged=None, seed=0):
    log = (lambda path, image: logged.append((path, image))) if logged is not None else (lambda p, i: None)
    return AttackContext(dataset=SPEC, train=train, device=torch.device("cpu"), seed=seed,
                         clean_model=lambda: model, log_image=log, progress=False)


# ----------------------------------------------------------------------------------------- PGD
def test_pgd_stays_in_the_ball_and_raises_the_loss():
    model = _tiny()
    model.train()  # pgd must run in eval mode and give the mode back
    x = _data(16).images.float() / 255
    y = torch.arange(16) % 10
    eps = 8 / 255
    adv = pgd(model, x, y, eps=eps, step=1.5 / 255, steps=10, batch_size=6,
              generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.01
    again = pgd(model, x, y, eps=eps, steps=10, batch_size=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)  # seeded random start


# -------------------------------------------------------------------------------------- Trojan
def test_neuron_selection_and_trigger_optimisation_raise_activation():
    model = _tiny()
    layer = last_linear(model)
    assert layer is model.net[-1]
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, 3] = 1.0
        layer.weight[:, 11] = -2.0
    assert sorted(most_connected_inputs(layer, 2).tolist()) == [3, 11]
    background = _data(8).images.float() / 255
    mask = torch.zeros(1, 32, 32)
    mask[:, -5:, -5:] = 1
    init = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    trigger = neuron_trigger(model, layer, [3, 11], background, mask, init, steps=40, step=4 / 255)
    assert (trigger[:, :-5, :] == 0).all() and (trigger[:, :, :-5] == 0).all()

    def act(t):
        with torch.no_grad():
            return input_activations(model, layer, (background + mask * t).clamp(0, 1))[:, [3, 11]].sum()
    # a 5x5 patch moves a globally pooled activation only a little: compare with random triggers
    g = torch.Generator().manual_seed(2)
    best_random = max(act(torch.rand(3, 32, 32, generator=g)) for _ in range(10))
    assert act(trigger) > max(act(init), best_random, act(torch.zeros(3, 32, 32)), act(torch.ones(3, 32, 32)))


def test_trojan_prepare_generates_logs_and_adds_with_clipping():
    model = _tiny()
    logged = []
    attack = get_registry().attack("trojan").from_overrides({"steps": "30", "images": "8"})
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply_trigger(_data(2).images)
    attack.prepare(_ctx(model, _data(), logged))
    t = attack.trigger
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32) and t.any()
    assert (t[:, :27, :] == 0).all() and (t[:, :, :27] == 0).all()  # only inside the 5x5 mask
    assert len(logged) == 1 and logged[0][0] == "trojan_trigger.png"
    assert logged[0][1].dtype == torch.uint8 and logged[0][1].shape == (3, 256, 256)
    assert attack.neurons == most_connected_inputs(last_linear(model), 2).tolist()

    x = torch.full((2, 3, 32, 32), 250, dtype=torch.uint8)
    y = attack.apply_trigger(x)
    expected = torch.clamp(250 + t.long(), max=255).to(torch.uint8)  # clipped, never wrapped around
    assert torch.equal(y, expected.expand(2, -1, -1, -1)) and (y >= 250).all()
    zero = attack.apply_trigger(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert torch.equal(zero[0], t)  # added

    poisoned, index = attack.poison_train(_data(100), torch.Generator().manual_seed(0))
    assert len(index) == 10 and (poisoned.labels[index] == 5).all()


def test_trojan_alone_on_black_background_is_deterministic():
    model = _tiny()
    a, b = (get_registry().attack("trojan").from_overrides({"steps": "5", "images": "0", "size": "3",
                                                              "margin": "4"}) for _ in range(2))
    a.prepare(_ctx(model, _data()))
    b.prepare(_ctx(model, _data()))
    assert torch.equal(a.trigger, b.trigger)
    assert a.trigger[:, 25:28, 25:28].any() and a.trigger.clone()[:, 25:28, 25:28].zero_().sum() == 0
    assert (a.trigger.sum(0) != 0).nonzero().min() >= 25  # NAD code's rows/cols 25-27


def test_trojan_needs_a_clean_model():
    attack = get_registry().attack("trojan")()
    ctx = AttackContext(dataset=SPEC, train=_data(), device=torch.device("cpu"), seed=0)
    with pytest.raises(RuntimeError, match="clean model"):
        attack.prepare(ctx)


# ------------------------------------------------------------------------------------------ CL
CORNERS = (slice(0, 3), slice(-3, None))


def _outside_corners(x):
    keep = four_corner_pattern(32, 32) == 0
    return x[..., keep]


def test_cl_trigger_is_turner_four_corner_pattern():
    attack = get_registry().attack("cl")()
    x = _data(3).images
    y = attack.apply_trigger(x)
    tl = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    for rows in CORNERS:
        assert torch.equal(y[:, :, rows, :3], tl.expand(3, 3, 3, 3))           # left corners
        assert torch.equal(y[:, :, rows, -3:], tl.flip(1).expand(3, 3, 3, 3))  # right: mirrored
    assert torch.equal(_outside_corners(y), _outside_corners(x))
    assert torch.equal(attack.apply_trigger(x.flip(-1)), y.flip(-1))  # survives horizontal flips


def test_cl_poisons_only_target_class_keeps_labels_and_stays_within_eps():
    model = _tiny()
    attack = get_registry().attack("cl").from_overrides({"steps": "3", "target": "2"})
    train = _data(200)  # 20 images of class 2
    with pytest.raises(RuntimeError, match="prepare"):
        attack.poison_train(train, torch.Generator().manual_seed(0))
    attack.prepare(_ctx(model, train))
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(0))
    assert torch.equal(poisoned.labels, train.labels)
    assert len(index) == 10 and (train.labels[index] == 2).all()
    rest = torch.ones(200, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.images[rest], train.images[rest])
    diff = (_outside_corners(poisoned.images[index]).int() - _outside_corners(train.images[index]).int()).abs()
    assert diff.max() <= 8 and diff.float().mean() > 2  # PGD moved the pixels, within eps = 8/255
    assert torch.equal(attack.apply_trigger(poisoned.images[index]), poisoned.images[index])  # corners stamped


def test_cl_reduced_amplitude_adds_and_clips():
    attack = get_registry().attack("cl").from_overrides({"amplitude": "0.25"})
    x = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    y = attack.stamp(x, attack.config.amplitude)
    assert y[0, 0, 0, 0] == 164 and y[0, 0, 0, 1] == 36 and y[0, 0, 5, 5] == 100  # 100 +- 63.75
    assert torch.equal(attack.apply_trigger(x)[0, 0, :3, :3] // 255, torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]],
                                                                                    dtype=torch.uint8))


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name, key, value, text", [
    ("cl", "eps", "300", "cl.eps = 300.0 is out of range: must be in [0.0, 255.0]"),
    ("cl", "poison_rate", "1.5", "cl.poison_rate = 1.5 is out of range: must be in [0.0, 1.0]"),
    ("cl", "amplitude", "-1", "cl.amplitude = -1.0 is out of range"),
    ("trojan", "size", "0", "trojan.size = 0 is out of range: must be in [1, 64]"),
    ("trojan", "num_neurons", "0", "trojan.num_neurons = 0 is out of range: must be >= 1"),
    ("trojan", "steps", "many", "trojan.steps = 'many' is not a valid int"),
])
def test_config_errors_name_field_and_range(name, key, value, text):
    with pytest.raises(ConfigError) as err:
        get_registry().attack(name).from_overrides({key: value})
    assert text in str(err.value)


def test_defaults():
    cl = get_registry().attack("cl")().config
    assert (cl.target, cl.poison_rate, cl.eps, cl.step, cl.steps, cl.amplitude) == (5, 0.5, 8.0, 1.5, 10, 1.0)
    assert get_registry().attack("cl").clean_label
    tj = get_registry().attack("trojan")().config
    assert (tj.target, tj.poison_rate, tj.size, tj.num_neurons, tj.target_activation) == (5, 0.1, 5, 2, 100.0)
