"""Properties of the stegastamp attack (SSBA's trigger generator, Li et al., ICCV 2021) and its
StegaStamp encoder: the residual is bounded (PSNR >= 25 dB), has a part of its own in each image
(beside the large part all share, why it is not named SSBA), and carries the hidden bit string (the
decoder reads it back); the poisoning is dirty-label all-to-one."""
import pytest
import torch

from conftest import real_subset
from nadbench.toolkit.stegastamp import StegaStamp


def test_the_residual_is_bounded_whatever_the_weights():
    net = StegaStamp(bits=8, bound=12 / 255)
    for p in net.parameters():  # large weights saturate the generator's output
        torch.nn.init.normal_(p, std=3.0)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        r = net.encode(x, torch.randint(0, 2, (4, 8)))
    assert float(r.abs().max()) <= 12 / 255 + 1e-6 and float(r.abs().max()) > 6 / 255


@pytest.fixture(scope="module")
def crafted(stegastamp_prepared):
    """The suite's attack (conftest.STEGASTAMP_ENCODER: 8 bits; with 4 the encoder settles on an almost
    fixed pattern) with the training images its encoder saw and 200 test images."""
    train, test = real_subset(4000, 200)
    return stegastamp_prepared, train, test


def test_stegastamp_encoder_hides_the_string_invisibly(crafted, record):
    """Bit accuracy on held-out training images and the residual's PSNR, as ``prepare`` measured them."""
    attack, _, _ = crafted
    record(bit_accuracy=attack.bit_accuracy, psnr_db=attack.psnr)
    # seeds 0/1/2 in float32 (a Xeon with AMX): 0.986 / 0.946 / 0.989 at 29.3 / 29.5 / 29.1 dB
    assert attack.psnr >= 25 and attack.bit_accuracy >= 0.9


def _sample_specific(x: torch.Tensor, triggered: torch.Tensor) -> tuple[float, float]:
    """(mean correlation of the residuals of two different images, RMS of the residuals' deviation
    from their mean residual, in levels)."""
    r = triggered.float() - x.float()
    flat = r.flatten(1) - r.flatten(1).mean(1, keepdim=True)
    corr = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None] + 1e-9)
    return float(corr[~torch.eye(len(x), dtype=torch.bool)].mean()), float((r - r.mean(0)).pow(2).mean().sqrt())


def test_stegastamp_residuals_have_a_part_of_their_own_and_are_bounded(crafted, record):
    """Each image's residual has its own part: against a fixed additive pattern of the same mean
    residual (what a sample-agnostic trigger would give, clipping aside)."""
    attack, _, test = crafted
    x = test.images[:100]
    triggered = attack.apply_trigger(x)
    assert float((triggered.float() - x.float()).abs().max()) <= 12 + 1  # the bound, plus rounding
    corr, spread = _sample_specific(x, triggered)
    pattern = (triggered.float() - x.float()).mean(0)
    fixed_corr, fixed_spread = _sample_specific(x, (x.float() + pattern).round().clamp(0, 255).byte())
    # seeds 0/1/2 in float32: ours 0.875 / 0.864 / 0.883 and 3.14 / 3.21 / 3.18 levels on a Xeon with AMX,
    # 0.844 / 0.892 / 0.904 and 3.47 / 3.12 / 2.99 on an AMD EPYC (AVX512-BF16), where the old
    # separator 0.9 failed at seed 2; the fixed pattern 0.986-0.988 and 0.91-1.03 levels (clipping only) on
    # both. The residuals share a large common part: the plugin's docstring says why, and why that keeps
    # the name SSBA off it.
    record(corr=corr, spread=spread, fixed_corr=fixed_corr, fixed_spread=fixed_spread)
    assert corr < 0.95 < fixed_corr and spread > 2 > fixed_spread


def test_stegastamp_poisons_dirty_label_all_to_one(crafted):
    attack, train, _ = crafted
    part = train.subset(torch.arange(200))
    poisoned, index = attack.poison_train(part, torch.Generator().manual_seed(0))
    assert len(index) == 20 and bool((poisoned.labels[index] == 0).all())
    assert torch.equal(poisoned.images[index], attack.apply_trigger(part.images[index]))
