"""The training loop's one extension point (``train(..., step=)``), all-to-all targets, and the
defining properties of the attacks that control training (WaNet, BppAttack) on real images."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import real_subset, toy_split
from nadbench import Split
from nadbench.engine import Cell, Runner, configured, profile
from nadbench.training.evaluate import attack_success_rate
from nadbench.engine.poisoning import seeded
from nadbench.engine.registry import PluginError, PluginInfo, get_registry
from nadbench.training.steps import LabelKeepingSamples, TriggerAfterAugmentation
from nadbench.training.train import Optim, Step, train
from nadbench.toolkit.warping import identity_grid


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 10))


# ---------------------------------------------------------------------------------- the step
def test_a_step_changes_the_batch_and_the_update_and_the_loop_keeps_the_rest():
    data = toy_split(40, 0)
    seen, updates = [], []

    class Recording(Step):
        def batch(self, x, y, index, generator):
            seen.append((x.dtype, float(x.min()), float(x.max()), index.clone()))
            return x[:-1], y[:-1]  # a step may change the batch's size

        def update(self, model, x, y, optimizer):
            updates.append((len(y), optimizer.param_groups[0]["lr"]))
            return super().update(model, x, y, optimizer)

    opt = Optim(epochs=2, lr=0.1, batch_size=16, schedule="step", milestones=(1,))
    losses = []
    train(_tiny_model(), data, opt, seed=0, step=Recording(), progress=False,
          on_epoch=lambda e, loss: losses.append(loss))
    assert len(seen) == 6 and all(d == torch.float32 and lo >= 0 and hi <= 1 for d, lo, hi, _ in seen)
    # each epoch's batches are a permutation of the training set's rows
    assert sorted(torch.cat([i for *_, i in seen[:3]]).tolist()) == list(range(40))
    assert [n for n, _ in updates] == [15, 15, 7] * 2
    assert [lr for _, lr in updates] == [0.1] * 3 + [pytest.approx(0.01)] * 3  # the loop's schedule
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert not Recording().plain() and Step().plain()
    with pytest.raises(TypeError, match="not both"):
        train(_tiny_model(), data, opt, seed=0, step=Step(), loss_fn=lambda m, x, y: 0, progress=False)


def test_label_keeping_samples_replace_a_share_of_the_unpoisoned_images_and_keep_their_labels():
    x, y = torch.rand(50, 3, 8, 8), torch.arange(50) % 10
    poisoned = torch.arange(0, 50, 2)  # the even rows
    step = LabelKeepingSamples(0.2, lambda images, gen: 1 - images, poisoned, 50)
    out, labels = step.batch(x, y, torch.arange(50), torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1).nonzero().flatten()
    assert torch.equal(labels, y) and len(changed) == 10  # int(50 * 0.2)
    assert bool((changed % 2 == 1).all())  # never a poisoned image
    assert torch.allclose(out[changed], 1 - x[changed])


def test_a_trigger_after_augmentation_reaches_exactly_the_poisoned_rows_the_model_sees():
    """``TriggerAfterAugmentation`` (FTrojan's step): after the loop's crop and flip, the poisoned
    rows carry the whole trigger, aligned as at test time, and no other row does."""
    inputs, masks = [], []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            inputs.append(x.detach().clone())
            return self.linear(x.flatten(1))

    class Recording(TriggerAfterAugmentation):
        def update(self, model, x, y, optimizer):
            masks.append(self.mine.clone())
            return super().update(model, x, y, optimizer)

    poisoned = torch.arange(0, 32, 4)
    step = Recording(lambda x: torch.ones_like(x), poisoned, 32)
    train(Spy(), toy_split(32, 0), Optim(epochs=2, batch_size=8, crop=4, flip=True), seed=0, step=step, progress=False)
    assert len(inputs) == 8 and sum(int(m.sum()) for m in masks) == 2 * len(poisoned)
    for x, mine in zip(inputs, masks):
        assert bool((x[mine] == 1).all()) and not bool((x[~mine] == 1).flatten(1).all(1).any())
    ftrojan = configured(get_registry(), "attacks", "ftrojan@aligned")
    data = toy_split(40, 1)
    images = ftrojan.poison_images(data.images[:4], data.labels[:4])
    assert torch.equal(images, data.images[:4])  # the stored rows: relabelled, trigger added in training


# ------------------------------------------------------------------ attacks that learn their trigger
def test_a_learnt_trigger_is_stored_per_model_and_the_asr_set_is_the_students(toy_registry, tmp_path, monkeypatch):
    """The third-party learned-patch attack (tests/packages): the student and a supplied teacher of
    another architecture each learn their own patch, stored with each model; the cell's ASR set is
    made with the student's, and another runner (a worker, a resumed grid) gets both back."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "packages" / "nadbench-learnedpatch"))
    import nadbench_learnedpatch

    reg = toy_registry()
    reg.add_plugin(nadbench_learnedpatch, PluginInfo("learnedpatch", "nadbench_learnedpatch", "nadbench-learnedpatch 0.1"))

    def runner():
        return Runner(reg, profile("quick", {"epochs": "2", "batch_size": "16", "crop": "0"}),
                      device=torch.device("cpu"), progress=False, cache_dir=tmp_path / "cache",
                      overrides={"nad": {"epochs": "1", "teacher_epochs": "1"}, "learned-patch": {"poison_rate": "0.5"}})

    cell = Cell("toy", "learned-patch", "nad", "wrn-16-1", "wrn-16-2", 0)
    first = runner()
    first.run_cell(cell)
    plan = first.plan(cell)
    student, teacher = (first.model_entry(k)["attack/pattern"] for k in (plan.student, plan.teacher))
    assert not torch.equal(student, teacher)  # each model's own training learnt its own patch
    assert torch.equal(plan.attack.pattern, student)  # the teacher's training did not overwrite the cell's
    p = first.armed(cell)
    stamped = (student * 255).round().to(torch.uint8)
    assert len(p.triggered) == 36 and bool((p.triggered.images[:, :, -5:, -5:] == stamped).all())
    again = runner()  # from the store: the model, the student's patch and its ASR set
    assert again.backdoored(cell).hit and torch.equal(again.plan(cell).attack.pattern, student)
    assert torch.equal(again.armed(cell).triggered.images, p.triggered.images)


# --------------------------------------------------------------------------------- targets
def test_all_to_all_targets_are_per_image_through_poisoning_and_asr():
    reg = get_registry()
    data = toy_split(200, 0)
    attack = configured(reg, "attacks", "badnets@all2all")
    attack.num_classes = 10
    poisoned, index = attack.poison_train(data, seeded(0, "poison"))
    assert len(index) == 80  # badnets@all2all starts from 40 % (BadNets.variant_defaults)
    assert torch.equal(poisoned.labels[index], (data.labels[index] + 1) % 10)  # y -> y + 1 mod C
    test = toy_split(40, 1)
    triggered = attack.trigger_test(test)
    assert len(triggered) == 40  # every image's target differs from its label: none left out
    targets = attack.targets(triggered.labels)

    class Predicts(torch.nn.Module):  # predicts y + 1 mod C of the image it was given
        def __init__(self, labels):
            super().__init__()
            self.labels, self.w = labels, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return F.one_hot((self.labels[: len(x)] + 1) % 10, 10).float() + self.w

    assert attack_success_rate(Predicts(triggered.labels), triggered, targets) == 1.0
    # read as all-to-one (one target for all), the same predictions are mostly failures
    one = configured(reg, "attacks", "badnets")
    keep = one.trigger_test(test)
    assert len(keep) == 36 and bool((keep.labels != 5).all())
    assert attack_success_rate(Predicts(keep.labels), keep, 5) < 0.2
    with pytest.raises(ValueError, match="own label"):
        attack_success_rate(Predicts(test.labels), Split(test.images, test.labels), test.labels)


def test_variants_are_named_checked_and_addressed_by_set():
    reg = get_registry()
    sets = {"attack.blend": {"alpha": "0.3"}, "attack.blend@all2all": {"poison_rate": "0.2"}}
    variant = configured(reg, "attacks", "blend@all2all", sets)
    assert (variant.config.target_mode, variant.config.alpha, variant.config.poison_rate) == ("all2all", 0.3, 0.2)
    plain = configured(reg, "attacks", "blend", sets)
    assert (plain.config.target_mode, plain.config.poison_rate) == ("all2one", 0.1)
    for bad, valid in (("sig@all2all", "valid variants of sig: @bb.*badnets, blend"),
                       ("badnets@all2some", "valid variants of badnets: @all2all")):
        with pytest.raises(PluginError, match=valid):
            reg.attack(bad)


# ---------------------------------------------------------------- WaNet and BppAttack, real images
@pytest.fixture(scope="module")
def images():
    return real_subset(200, 10)[0].images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean()
    return float(10 * torch.log10(255 ** 2 / mse))


def test_wanet_warps_by_its_strength_imperceptibly_and_its_noise_mode_keeps_labels(images):
    reg = get_registry()
    wanet = configured(reg, "attacks", "wanet")
    grid = wanet._grid(32)
    pixels = (grid - identity_grid(32)).abs() * 31 / 2  # displacement in pixels, per axis
    # s = 0.5 moves pixels by a fraction of a pixel (measured: mean 0.167, max 0.497); twice s, twice that
    assert 0.1 < float(pixels.mean()) < 0.3 and float(pixels.max()) < 1.0
    strong = configured(reg, "attacks", "wanet", {"wanet": {"strength": "1.0"}})
    assert float((strong._grid(32) - identity_grid(32)).abs().mean() * 31 / 2) == pytest.approx(
        2 * float(pixels.mean()), rel=0.05)
    warped = wanet.apply_trigger(images)
    assert _psnr(warped, images) > 28  # measured 31.4 dB on these images
    assert bool(((warped.float() - images.float()).abs() > 0).float().mean() > 0.5)  # the whole image moves
    step = wanet.train_step(torch.arange(0, 200, 10), 200)
    x, y = images.float() / 255, torch.arange(200) % 10
    out, labels = step.batch(x, y, torch.arange(200), torch.Generator().manual_seed(0))
    assert torch.equal(labels, y)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == int(200 * 0.2) and not bool(changed[::10].any())
    # noise mode: the field plus noise, not the exact trigger
    exact = wanet.apply_trigger(images[changed]).float() / 255
    assert float((out[changed] - exact).abs().mean()) > 0.005


def test_bppattack_quantises_to_its_levels_and_its_negatives_keep_labels(images):
    bpp = configured(get_registry(), "attacks", "bppattack")
    squeezed = bpp.apply_trigger(images)
    levels = torch.linspace(0, 255, 8).round().to(torch.uint8)
    assert bool(torch.isin(squeezed, levels).all())  # 8 levels per channel
    assert float((squeezed.float() - images.float()).abs().max()) <= 255 / 14 + 1  # half a level, rounded
    assert _psnr(squeezed, images) > 25  # measured 27.8 dB
    step = bpp.train_step(torch.arange(0, 200, 5), 200)
    x, y = images.float() / 255, torch.arange(200) % 10
    out, labels = step.batch(x, y, torch.arange(200), torch.Generator().manual_seed(1))
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(labels, y) and int(changed.sum()) == 40 and not bool(changed[::5].any())
    # a negative is its image plus another image's residual: no larger than half a level, not quantised
    assert float((out[changed] - x[changed]).abs().max()) <= 1 / 14 + 1e-6
    assert not bool(torch.isin((out[changed] * 255).round().to(torch.uint8), levels).all())


def test_bppattack_never_gives_a_negative_its_own_residual():
    """A negative is its image plus *another* image's quantisation residual: its own would make it the
    trigger image under its true label. Random images, so every row's residual is distinct."""
    bpp = configured(get_registry(), "attacks", "bppattack")
    negatives = bpp.train_step(torch.arange(0), 1).transform
    for n in (2, 3, 12):
        x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
        residual = bpp.quantise(x) - x
        for seed in range(200):
            added = negatives(x, torch.Generator().manual_seed(seed)) - x
            source = torch.cdist(added.flatten(1), residual.flatten(1)).argmin(1)
            assert torch.allclose(added, residual[source], atol=1e-6)
            assert not bool((source == torch.arange(n)).any()), (n, seed, source)
    x = torch.rand(1, 3, 4, 4)  # a lone image has no other: it stays as it is
    assert torch.equal(negatives(x, torch.Generator().manual_seed(0)), x)
