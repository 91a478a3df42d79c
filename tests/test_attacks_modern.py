"""Defining properties of the frequency helpers (``nadbench.toolkit.frequency``), FTrojan and Adap-Blend:
what a broken transform, a trigger in the wrong coefficients or a wrong piece mask would violate."""
import pytest
import torch

from conftest import real_subset
from nadbench import ConfigError, Split
from nadbench.engine import configured
from nadbench.engine.registry import get_registry
from nadbench.toolkit.frequency import dct2, dct_matrix, idct2, rgb_to_yuv, yuv_to_rgb
from nadbench.plugins.attacks.adaptive_blend import AdaptiveBlend
from nadbench.plugins.attacks.blend import Blend
from nadbench.plugins.attacks.ftrojan import FTrojan


@pytest.fixture(scope="module")
def train():
    return real_subset(200, 10)[0]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(255 ** 2 / ((a.float() - b.float()) ** 2).mean()))


def _yuv_dct(images: torch.Tensor, window: int = 32) -> torch.Tensor:
    return dct2(rgb_to_yuv(images.double()), window)


# ------------------------------------------------------------------------------ frequency helpers
def test_dct_is_orthonormal_matches_the_reference_and_inverts():
    d = dct_matrix(32, torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scipy_fft = pytest.importorskip("scipy.fft")  # cv2.dct (the official code's) is this orthonormal DCT-II
    ref = torch.from_numpy(scipy_fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)))
    assert torch.allclose(dct2(x), ref, atol=1e-10)
    blocks = torch.from_numpy(scipy_fft.dctn(x[0, 1, 8:16, 24:32].numpy(), type=2, norm="ortho"))
    assert torch.allclose(dct2(x, 8)[0, 1, 8:16, 24:32], blocks, atol=1e-10)  # tiles are independent
    assert float(dct2(x).pow(2).sum()) == pytest.approx(float(x.pow(2).sum()))  # energy preserved
    x32 = x.float()
    for block in (None, 32, 16, 8, 4):
        assert float((idct2(dct2(x32, block), block) - x32).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="does not divide"):
        dct2(x, 5)


def test_yuv_is_bt601_full_range_and_inverts():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert float((yuv_to_rgb(rgb_to_yuv(x)) - x).abs().max()) < 1e-5
    grey, red, blue = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in
                       ((0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    assert torch.allclose(rgb_to_yuv(grey).flatten(), torch.tensor([0.5, 0, 0], dtype=torch.float64), atol=1e-12)
    y, u, v = rgb_to_yuv(red).flatten().tolist()
    assert (y, u, v) == pytest.approx((0.299, -0.299 / 1.772, 0.5))  # V is red-difference (Cr), in [-0.5, 0.5]
    y, u, v = rgb_to_yuv(blue).flatten().tolist()
    assert (y, u, v) == pytest.approx((0.114, 0.5, -0.114 / 1.402))  # U is blue-difference (Cb)


# ------------------------------------------------------------------------------ FTrojan
def test_ftrojan_defaults_are_the_official_cifar10_settings():
    """SoftWiser-group/FTrojan 300e05427f43, train.py's CIFAR-10 settings: 2 % of the training set
    poisoned, the trigger in the stored images (the victim trains); data poisoning, not training control."""
    cfg = FTrojan().config
    assert (cfg.target, cfg.magnitude, cfg.positions, cfg.channels, cfg.window, cfg.yuv) == (
        8, 20.0, (15, 15, 31, 31), (1, 2), 32, True)
    assert (cfg.poison_rate, cfg.after_augmentation, FTrojan().controls_training) == (0.02, False, False)
    aligned = configured(get_registry(), "attacks", "ftrojan@aligned")
    assert (aligned.config.after_augmentation, aligned.controls_training, aligned.config.poison_rate) == (True, True, 0.02)
    for bad in ({"positions": (15, 15, 31)}, {"positions": (15, 32)}, {"channels": (3,)}):
        with pytest.raises(ConfigError):
            FTrojan(FTrojan.Config(**bad))


@pytest.mark.parametrize("window, positions, channels, yuv", [
    (32, (15, 15, 31, 31), (1, 2), True), (8, (4, 4, 7, 7), (1, 2), True), (32, (3, 10), (0,), False)])
def test_ftrojan_trigger_is_the_magnitude_at_the_chosen_coefficients_and_nothing_else(window, positions, channels, yuv):
    attack = FTrojan(FTrojan.Config(window=window, positions=positions, channels=channels, yuv=yuv))
    pattern = attack.pattern(3, 32, 32)[None]
    coeffs = dct2(rgb_to_yuv(pattern) if yuv else pattern, window)[0]
    expected = torch.zeros_like(coeffs)
    for ch in channels:
        for r, c in zip(positions[::2], positions[1::2]):
            expected[ch, r::window, c::window] = 20.0  # in every window
    assert torch.allclose(coeffs, expected, atol=1e-9)
    assert int((expected != 0).sum()) == len(channels) * len(positions) // 2 * (32 // window) ** 2


def test_ftrojan_on_real_images_is_invisible_and_the_same_trigger_in_every_image(train):
    attack, x = FTrojan(), train.images
    triggered = attack.apply_trigger(x)
    assert triggered.dtype == torch.uint8 and triggered.shape == x.shape
    assert _psnr(triggered, x) > 40  # measured 45.9 dB on these 200 images
    assert int((triggered.int() - x.int()).abs().max()) <= 4  # |pattern| <= 3.8, plus rounding
    diff = _yuv_dct(triggered) - _yuv_dct(x)  # the trigger in the DCT domain, after uint8 rounding
    chosen = torch.zeros(3, 32, 32, dtype=torch.bool)
    chosen[1:, 15, 15] = chosen[1:, 31, 31] = True
    at = diff[:, chosen]  # (200, 4): every image carries the trigger, with one magnitude
    assert float((at - 20).abs().median()) < 1.0 and float(at.std(0).max()) < 1.0
    rest = diff[:, ~chosen]  # rounding (and clipping) noise only; the Y channel is untouched
    assert float(rest.abs().mean()) < 0.25 and float(diff[:, 0].abs().mean()) < 0.25
    assert float(at.abs().mean()) > 50 * float(rest.abs().mean())


def test_ftrojan_poisons_dirty_label_all_to_one_and_all_to_all(train):
    attack = FTrojan(FTrojan.Config(poison_rate=0.1))
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(0))
    assert len(index) == 20 and bool((poisoned.labels[index] == 8).all())
    assert len(FTrojan().poison_train(train, torch.Generator().manual_seed(0))[1]) == 4  # the default 2 %
    # by default the trigger is in the stored rows; with after_augmentation (@aligned) its step adds it in training
    assert torch.equal(poisoned.images[index], attack.apply_trigger(train.images[index]))
    assert attack.train_step(index, len(train)) is None
    aligned = FTrojan(FTrojan.Config(poison_rate=0.1, after_augmentation=True))
    assert torch.equal(aligned.poison_train(train, torch.Generator().manual_seed(0))[0].images[index],
                       train.images[index]) and aligned.train_step(index, len(train))
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.images[rest], train.images[rest]) and torch.equal(poisoned.labels[rest], train.labels[rest])
    a2a = FTrojan(FTrojan.Config(target_mode="all2all", poison_rate=0.1))
    a2a.num_classes = 10
    poisoned, index = a2a.poison_train(train, torch.Generator().manual_seed(0))
    assert torch.equal(poisoned.labels[index], (train.labels[index] + 1) % 10)
    assert len(a2a.trigger_test(train)) == len(train) and len(attack.trigger_test(train)) == int((train.labels != 8).sum())


# ------------------------------------------------------------------------------ Adap-Blend
def _applied_pieces(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(n, 16) bool: the 8 x 8 pieces in which pixels changed."""
    changed = (after != before).any(1).float()  # (n, 32, 32)
    return (changed.view(-1, 4, 8, 4, 8).mean((2, 4)) > 0.5).flatten(1)


def test_adaptive_blend_payload_and_cover_carry_random_halves_of_the_key(train):
    attack = AdaptiveBlend(AdaptiveBlend.Config(poison_rate=0.1, cover_rate=0.1, target_mode="all2all"))
    attack.num_classes = 10
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(0))
    assert len(index) == 40 and len(set(index.tolist())) == 40
    relabelled = poisoned.labels[index] != train.labels[index]
    assert int(relabelled.sum()) == 20  # payload: 20 relabelled; cover: 20 keep their labels
    assert torch.equal(poisoned.labels[index][relabelled], (train.labels[index][relabelled] + 1) % 10)
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.images[rest], train.images[rest]) and torch.equal(poisoned.labels[rest], train.labels[rest])
    before, after = train.images[index], poisoned.images[index]
    pieces = _applied_pieces(before, after)
    assert bool((pieces.sum(1) == 8).all())  # half of the 16 pieces on each image, cover and payload alike
    assert len({tuple(p.tolist()) for p in pieces}) >= 38  # drawn per image
    mask = pieces.view(-1, 1, 4, 1, 4, 1).expand(-1, 3, 4, 8, 4, 8).reshape(-1, 3, 32, 32)
    assert torch.equal(after[~mask], before[~mask])  # nothing outside the applied pieces
    key = attack.key(3, 32, 32).float().expand_as(before)
    blended = (before.float() + 0.15 * (key - before.float())).round()  # alpha 0.15 inside them
    assert float((after.float() - blended)[mask].abs().max()) <= 1
    again, same = attack.poison_train(train, torch.Generator().manual_seed(0))
    assert torch.equal(same, index) and torch.equal(again.images, poisoned.images)


def test_adaptive_blend_all_to_one_relabels_payload_to_the_target(train):
    attack = AdaptiveBlend(AdaptiveBlend.Config(poison_rate=0.1, cover_rate=0.05, target=3))
    poisoned, index = attack.poison_train(train, torch.Generator().manual_seed(1))
    assert len(index) == 30
    changed = poisoned.labels != train.labels
    assert bool(torch.isin(changed.nonzero().flatten(), index).all()) and bool((poisoned.labels[changed] == 3).all())
    assert 20 - int((train.labels[index] == 3).sum()) <= int(changed.sum()) <= 20
    # vtu81/backdoor-toolbox's README and config.py: 0.3 % payload, 0.3 % cover, alpha 0.15 / test 0.2
    cfg = AdaptiveBlend().config
    assert (cfg.poison_rate, cfg.cover_rate, cfg.alpha, cfg.test_alpha, cfg.pieces, cfg.mask_rate) == (
        0.003, 0.003, 0.15, 0.2, 16, 0.5)
    dense = configured(get_registry(), "attacks", "adaptive-blend@dense").config  # Blend's 10 %, 1:1
    assert (dense.poison_rate, dense.cover_rate) == (0.05, 0.05)


def test_adaptive_blend_test_trigger_is_the_whole_key_at_alpha_0_2(train):
    attack, x = AdaptiveBlend(AdaptiveBlend.Config(key_seed=3)), train.images
    key = attack.key(3, 32, 32)
    assert torch.equal(key, Blend(Blend.Config(key_seed=3))._make_key(3, 32, 32))  # Blend's key
    triggered = attack.apply_trigger(x)
    expected = (x.float() + 0.2 * (key.float() - x.float())).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(triggered, expected)
    assert float((triggered != x).any(1).float().mean()) > 0.9  # every piece, all over the image
    assert 20 < _psnr(triggered, x) < 25  # measured 22.5 dB (training images, alpha 0.15, half: 28.0)
    asr = attack.trigger_test(Split(x, train.labels))
    assert len(asr) == int((train.labels != 0).sum()) and torch.equal(asr.labels, train.labels[train.labels != 0])
    with pytest.raises(ConfigError, match="not a square"):
        AdaptiveBlend(AdaptiveBlend.Config(pieces=12))
    with pytest.raises(ConfigError, match="do not tile"):
        AdaptiveBlend(AdaptiveBlend.Config(pieces=9)).poison_train(train, torch.Generator().manual_seed(0))
