"""Blend, SIG and Refool: trigger formulas against hand computation, poisoning, seeding, config errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from nadbench import AttackContext, ConfigError, DatasetSpec, Split
from nadbench.plugins.attacks import refool as refool_mod
from nadbench.engine.plan import configured
from nadbench.engine.registry import get_registry


def _data(n=200, classes=10, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                 torch.arange(n) % classes)


def _ctx(name="gtsrb", seed=0, classes=43, asked=None, other_size=32, train=None):
    """A fake context whose ``load_dataset`` returns small random splits and records the names asked."""
    def load_dataset(other):
        if asked is not None:
            asked.append(other)
        return _data(50, seed=123, size=other_size), _data(10, seed=124, size=other_size)

    spec = DatasetSpec(name=name, load=None, num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    return AttackContext(dataset=spec, train=train or _data(20, classes), device="cpu", seed=seed,
                         load_dataset=load_dataset)


def _attack(name, **overrides):
    return get_registry().attack(name).from_overrides({k: str(v) for k, v in overrides.items()})


# ------------------------------------------------------------------------------------- Blend
def test_blend_is_the_convex_combination_with_a_fixed_seeded_key():
    attack = _attack("blend")  # alpha 0.2, key_seed 0; apply_trigger without prepare: lazy key
    x = _data(4, size=8).images
    y = attack.apply_trigger(x)
    key = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(attack.key, key)
    exact = 0.8 * x.double() + 0.2 * key.double()
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert (y.double() - exact).abs().max() <= 0.5 + 1e-6
    # the key depends on key_seed only, not on the grid seed
    a, b = _attack("blend"), _attack("blend")
    a.prepare(_ctx("cifar10", seed=0, classes=10))
    b.prepare(_ctx("cifar10", seed=7, classes=10))
    assert a.key.shape == (3, 32, 32) and torch.equal(a.key, b.key)
    c = _attack("blend", key_seed=1)
    c.prepare(_ctx("cifar10", classes=10))
    assert not torch.equal(a.key, c.key)


def test_blend_key_from_an_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "key.png"
    Image.new("RGB", (20, 12), (10, 200, 30)).save(path)
    attack = _attack("blend", key_image=path, alpha=0.5)
    attack.prepare(_ctx("cifar10", classes=10))
    assert attack.key.shape == (3, 32, 32)
    assert torch.equal(attack.key, torch.tensor([10, 200, 30], dtype=torch.uint8)[:, None, None].expand(3, 32, 32))
    y = attack.apply_trigger(torch.full((2, 3, 32, 32), 100, dtype=torch.uint8))
    assert y[:, :, 0, 0].tolist() == [[55, 150, 65]] * 2


def test_blend_poisons_ten_percent_dirty_label():
    attack = _attack("blend")
    train = _data(1000)
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(1))
    assert len(index) == 100 and (poisoned.labels[index] == 5).all()
    mask = torch.ones(1000, dtype=torch.bool)
    mask[index] = False
    assert torch.equal(poisoned.images[mask], train.images[mask])
    assert torch.equal(poisoned.images[index], attack.apply_trigger(train.images[index]))


def test_blend_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"blend\.alpha = 1\.5 is out of range: must be in \[0\.0, 1\.0\]"):
        _attack("blend", alpha=1.5)
    with pytest.raises(ConfigError, match=r"blend\.key_seed .* must be >= 0"):
        _attack("blend", key_seed=-1)
    with pytest.raises(ConfigError, match=r"blend\.key_image = .*missing\.png' is invalid: no such file"):
        _attack("blend", key_image=tmp_path / "missing.png")  # with the other checks, before anything runs


# --------------------------------------------------------------------------------------- SIG
def test_sig_signal_values_and_clipping():
    attack = _attack("sig")  # delta 20, freq 6
    v = attack.signal(32, 20.0)
    assert v.tolist() == pytest.approx([20 * math.sin(2 * math.pi * j * 6 / 32) for j in range(32)], abs=1e-4)
    quarter = _attack("sig", freq=1)  # m = 4, f = 1: sin at 0, pi/2, pi, 3pi/2
    for base, row in [(128, [128, 148, 128, 108]), (250, [250, 255, 250, 230]), (5, [5, 25, 5, 0])]:
        y = quarter.apply_trigger(torch.full((2, 3, 3, 4), base, dtype=torch.uint8))
        assert y.dtype == torch.uint8 and torch.equal(y, torch.tensor(row, dtype=torch.uint8).expand(2, 3, 3, 4))


def test_sig_test_delta_only_changes_the_test_trigger():
    attack = _attack("sig", freq=1, test_delta=40)
    x = torch.full((1, 3, 2, 4), 128, dtype=torch.uint8)
    assert attack.poison_images(x, torch.tensor([5]))[0, 0, 0].tolist() == [128, 148, 128, 108]
    assert attack.apply_trigger(x)[0, 0, 0].tolist() == [128, 168, 128, 88]


@pytest.mark.parametrize("rate,expected", [(1.0, 100), (0.3, 30)])
def test_sig_is_clean_label_on_the_target_class(rate, expected):
    attack = _attack("sig", poison_rate=rate)
    train = _data(1000)
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(1))
    assert torch.equal(poisoned.labels, train.labels)  # no label changed
    assert len(index) == expected and (train.labels[index] == 5).all()
    mask = torch.ones(1000, dtype=torch.bool)
    mask[index] = False
    assert torch.equal(poisoned.images[mask], train.images[mask])
    assert torch.equal(poisoned.images[index], attack.poison_images(train.images[index], train.labels[index]))
    triggered = attack.trigger_test(_data(100))
    assert len(triggered) == 90 and not (triggered.labels == 5).any()


def test_sig_config_errors():
    with pytest.raises(ConfigError, match=r"sig\.poison_rate = 2\.0 is out of range: must be in \[0\.0, 1\.0\]"):
        _attack("sig", poison_rate=2)
    with pytest.raises(ConfigError, match=r"sig\.delta = -1\.0 .*in \[0\.0, 255\.0\]"):
        _attack("sig", delta=-1)
    with pytest.raises(ConfigError, match=r"sig\.test_delta = 300 .*in \[0\.0, 255\.0\]"):
        _attack("sig", test_delta=300)
    assert _attack("sig", test_delta="none").config.test_delta is None


# ------------------------------------------------------------------------------------ Refool
@pytest.mark.parametrize("attacked,source", [("gtsrb", "cifar10"), ("cifar10", "gtsrb")])
def test_refool_pool_comes_from_the_other_dataset(attacked, source):
    asked = []
    attack = _attack("refool", pool_size=7)
    ctx = _ctx(attacked, asked=asked, other_size=40)
    attack.prepare(ctx)
    assert asked == [source]
    assert attack.pool.shape == (7, 3, 32, 32) and attack.pool.dtype == torch.uint8  # resized 40 -> 32
    same = _attack("refool", pool_size=7)
    same.prepare(ctx)
    assert torch.equal(attack.pool, same.pool)  # chosen under ctx.seed
    # never the attacked (evaluation) dataset
    with pytest.raises(ConfigError, match=r"refool\.reflection_dataset = 'gtsrb' is the attacked dataset"):
        _attack("refool", reflection_dataset="gtsrb").prepare(_ctx("gtsrb"))


def test_refool_pool_images_are_images_of_the_source():
    attack = _attack("refool", pool_size=5, reflection_dataset="svhn")
    asked = []
    attack.prepare(_ctx("gtsrb", asked=asked))
    source = _data(50, seed=123).images
    assert asked == ["svhn"]
    assert all(any(torch.equal(p, s) for s in source) for p in attack.pool)


def test_refool_output_range_shape_and_seeding():
    x = _data(40, classes=43, seed=3).images
    outs = []
    for seed in (0, 0, 1):
        attack = _attack("refool", pool_size=10)
        attack.prepare(_ctx("gtsrb", seed=seed))
        outs.append(attack.apply_trigger(x))
    y = outs[0]
    assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(y, x)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert torch.equal(attack.apply_trigger(x), outs[2])  # a second call: the same test trigger
    assert not torch.equal(attack.poison_images(x, torch.zeros(40)), outs[2])  # its own stream


@pytest.mark.parametrize("alpha_t, low, high", [(None, 0.55, 0.95), (0.4, 0.4, 0.4)])
def test_refool_with_a_black_reflection_only_darkens_in_gamma_space(alpha_t, low, high):
    """r = 0: both reflection models reduce to out = (a * x^2.2)^(1/2.2), a drawn from [0.55, 0.95]
    per image (the authors') or fixed (``alpha_t``, BackdoorBench's 0.4)."""
    attack = _attack("refool", pool_size=3, **({} if alpha_t is None else {"alpha_t": alpha_t}))
    attack.prepare(_ctx("gtsrb"))
    attack.pool.zero_()
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    ratio = attack.apply_trigger(x).double() / 200
    assert ratio.min() >= low ** (1 / 2.2) - 0.01 and ratio.max() <= high ** (1 / 2.2) + 0.01
    per_image = ratio.amax((1, 2, 3)) - ratio.amin((1, 2, 3))
    assert per_image.max() <= 0.006  # one transmission weight per image


def test_refool_ghost_matches_pad_crop_resize():
    r = torch.rand(3, 3, 32, 32)
    offset, g = torch.tensor([[3, 8], [5, 5], [8, 4]]), torch.tensor([0.2, 0.85, 0.5])
    got = refool_mod._ghost(r, offset, g)
    for k in range(3):
        dy, dx = offset[k].tolist()
        r1 = F.pad(r[k], (0, dx, 0, dy))  # the reference: two padded copies, blended, cropped, resized
        r2 = F.pad(r[k], (dx, 0, dy, 0))
        ghost = (g[k] * r1 + (1 - g[k]) * r2)[:, dy:-dy, dx:-dx]
        want = F.interpolate(ghost[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
        assert torch.allclose(got[k], want, atol=1e-5)


def test_refool_blur_matches_per_image_gaussian():
    x = torch.rand(3, 3, 32, 32)
    sigma = torch.tensor([1.0, 2.7, 5.0])
    got = refool_mod._blur(x, sigma)
    for k, s in enumerate(sigma.tolist()):
        rad = math.ceil(2 * s)
        taps = torch.arange(-rad, rad + 1, dtype=torch.float32)
        k1 = torch.exp(-taps ** 2 / (2 * s * s))
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        padded = F.pad(x[k:k + 1], (rad,) * 4, mode="reflect")
        want = F.conv2d(padded, k2.expand(3, 1, -1, -1), groups=3)
        assert torch.allclose(got[k:k + 1], want, atol=1e-5)
    mask = refool_mod._soft_mask(32, 32, "cpu")
    assert mask.max() == 1 and torch.allclose(mask, mask.flip(0)) and torch.allclose(mask, mask.T)
    assert mask[0, 0] < 0.1 < 0.9 < mask[15, 15]


def test_refool_on_gtsrb_clean_label_by_default_and_dirty_at_bb():
    """The authors' strategy.py: clean-label, infect_ratio 0.4 of the target class; BackdoorBench's
    config/attack/refool/default.yaml: dirty-label, pratio 0.1, target 0, alpha_t 0.4."""
    train = _data(430, classes=43)
    clean = _attack("refool", pool_size=5)
    clean.prepare(_ctx("gtsrb", train=train))
    poisoned, index = clean.poison_train(train, torch.Generator().manual_seed(0))
    assert torch.equal(poisoned.labels, train.labels) and len(index) == 4 and (train.labels[index] == 5).all()
    bb = configured(get_registry(), "attacks", "refool@bb", {"attack.refool": {"pool_size": "5"}})
    assert (bb.config.clean_label, bb.config.poison_rate, bb.config.target, bb.config.alpha_t) == (False, 0.1, 0, 0.4)
    bb.prepare(_ctx("gtsrb", train=train))
    poisoned, index = bb.poison_train(train, torch.Generator().manual_seed(0))
    assert len(index) == 43 and (poisoned.labels[index] == 0).all()


def test_refool_reflection_folder(tmp_path):
    from PIL import Image

    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (50, 40), colour).save(tmp_path / f"r{k}.jpg" if k else tmp_path / f"r{k}.png")
    asked = []
    attack = _attack("refool", reflection_folder=tmp_path, pool_size=2)
    attack.prepare(_ctx("gtsrb", asked=asked))
    assert asked == [] and attack.pool.shape == (2, 3, 32, 32)
    assert (attack.pool.amax((2, 3)) >= 250).sum() == 2  # each one a saturated colour
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"refool\.reflection_folder = .* holds no"):
        _attack("refool", reflection_folder=empty).prepare(_ctx("gtsrb"))


def test_refool_errors():
    with pytest.raises(ConfigError, match=r"refool\.pool_size = 0 is out of range: must be >= 1"):
        _attack("refool", pool_size=0)
    with pytest.raises(ConfigError, match=r"refool\.ghost_rate = 1\.5 .*in \[0\.0, 1\.0\]"):
        _attack("refool", ghost_rate=1.5)
    with pytest.raises(RuntimeError, match="prepare"):
        _attack("refool").apply_trigger(_data(2).images)
