"""Every defense repairs a real BadNets model: a committed fixture (tests/fixtures/), repaired with
1,000 clean CIFAR-10 images (5% of the 20,000 it was trained on), measured on 1,000 test images.

Each bound lies beyond the worst of seeds 0, 1, 2 (the defense's randomness) measured in float32
(tests/conftest.py), and a no-op defense fails it (it keeps ASR 100). The values beside the bounds
("seeds 0/1/2") are from a 2-core Xeon with AMX: benchmarks/results/test-margins-intel-amx.md,
made by benchmarks/test_margins.py; an AMD EPYC's (AVX512-BF16) are in test-margins-amd-avx512bf16.md."""
import pytest
import torch

from conftest import fixture_model, real_subset
from nadbench.contract.api import DefenseContext
from nadbench.engine import apply_defense, attention_layers, configured
from nadbench.training.evaluate import evaluate, predict
from nadbench.training.models import build
from nadbench.engine.registry import get_registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    """(clean subset, test subset, the ASR set of BadNets' trigger on the test subset)."""
    clean, test = real_subset(1000, 1000)
    attack = get_registry().attack("badnets")()
    return clean, test, attack.trigger_test(test)


_BEFORE: dict[str, dict] = {}  # fixture name -> its ASR/ACC on the test subset (measured once)


def _defend(name, data, model="badnets", clean=None, seed=0, **overrides):
    """Repair the fixture ``model`` with ``name`` on the clean subset (or ``clean``), the defense's
    randomness seeded with ``seed``: (repaired, ASR/ACC before, after, what the defense logged)."""
    reg = get_registry()
    subset, test, triggered = data
    clean = subset if clean is None else clean
    fixture, model = model, fixture_model(model)
    if fixture not in _BEFORE:
        _BEFORE[fixture] = evaluate(model, test, triggered, 5)
    before = _BEFORE[fixture]
    layers = attention_layers(reg, "wrn-16-1", "cifar10")
    logged = {}
    ctx = DefenseContext(device=torch.device("cpu"), num_classes=10, student="wrn-16-1", teacher="wrn-16-1", seed=seed,
                         student_layers=layers, teacher_layers=layers, classifier_layer="net.fc",
                         build_model=lambda arch: build(reg.model(arch), reg.dataset("cifar10")),
                         log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v), progress=False)
    defense = configured(reg, "defenses", name, {name: {k: str(v) for k, v in overrides.items()}})
    repaired, _ = apply_defense(defense, model, clean, ctx)
    after = evaluate(repaired.model, test, triggered, 5)
    print(f"{name}: before {before}, after {after}")
    return repaired, before, after, logged


def test_fine_pruning_zeroes_the_pruned_channels_and_changes_predictions(data, effect_seed, record):
    repaired, before, after, logged = _defend("fine-pruning", data, seed=effect_seed, finetune="false")
    model, test = repaired.model, data[1]
    pruned = (model.net.fc.weight == 0).all(0)
    n = int(pruned.sum())
    print(f"pruned {n} channels; held-out ACC curve {logged['prune.acc'][:3]}..{logged['prune.acc'][-3:]}")
    assert n == logged["prune.channels"][0] and 0 < n <= int(0.9 * 64)
    # The pruned channels' outputs no longer reach the logits: set them to anything, nothing changes.
    feats = []
    hook = model.net.fc.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        logits = model(test.images[:64].float() / 255)
    hook.remove()
    noisy = feats[0].clone()
    noisy[:, pruned] = 1e3
    assert torch.allclose(model.net.fc(noisy), logits, atol=1e-4)
    # Pruning alone changed the model's decisions (finetuning is off here).
    changed = (predict(model, test.images) != predict(fixture_model("badnets"), test.images)).float().mean()
    record(changed=changed, pruned=n)
    assert changed > 0.005  # seeds 0/1/2: 0.134 / 0.140 / 0.185 (a no-op: 0)
    # Selected on the held-out clean slice: its ACC stayed within 10% of the unpruned one.
    acc = logged["prune.acc"]
    assert acc[n] >= 0.9 * acc[0]


def test_mcr_point_leaves_the_straight_line_and_removes_most_of_the_backdoor(data, effect_seed, record):
    """3 curve epochs (its default: 20, the authors' 100): the control point has left the line by then."""
    repaired, before, after, _ = _defend("mcr", data, seed=effect_seed, epochs=3, curve_epochs=3, curve_points=3)
    ends = repaired.extras[0.0], repaired.extras[1.0]
    line = {n: torch.lerp(a, b, 0.3).detach() for (n, a), b in zip(ends[0].named_parameters(), ends[1].parameters())}
    with torch.no_grad():
        moved = max(float((p - line[n]).norm() / line[n].norm()) for n, p in repaired.model.named_parameters()
                    if p.ndim > 1)
    print(f"largest relative distance of a weight tensor from the straight line: {moved:.3f}")
    assert moved > 0.01  # the control point was trained: not the linear interpolation
    # seeds 0/1/2: 1.4 / 1.5 / 1.2 % off the straight line; ASR 0.54 / 0.71 / 0.50 at t = 0.3 and 0.12 /
    # 0.15 / 0.13 at t = 0.5, ACC drops 0.05 / 0.06 / 0.05 and 0.09 / 0.10 / 0.09.
    middle = evaluate(repaired.extras[0.5], data[1], data[2], 5)
    record(moved=moved, asr=after["asr"], acc_drop=before["acc"] - after["acc"], asr_t05=middle["asr"],
           acc_drop_t05=before["acc"] - middle["acc"])
    assert before["asr"] > 0.9
    assert after["asr"] < 0.85 and middle["asr"] < 0.4, (after, middle)
    assert after["acc"] > before["acc"] - 0.15 and middle["acc"] > before["acc"] - 0.15, (before, after, middle)



# The defenses since the paper, at their own settings but shorter where they iterate (before: ASR 100,
# ACC 71.1).
def test_clp_prunes_without_data_and_weakens_the_backdoor(data, record):
    """Data-free and deterministic: no seed to sweep."""
    repaired, before, after, logged = _defend("clp", data)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"], pruned=logged["clp.pruned_total"][0])
    assert before["asr"] > 0.9
    # 3 channels pruned: ASR 0.63, ACC drop 0.00
    assert after["asr"] < 0.85 and after["acc"] > before["acc"] - 0.02, (before, after)


@pytest.fixture(scope="module")
def fst(data, effect_seed):
    """5 epochs at batch 64 (its 10 at 128: the same 80 updates, half the images)."""
    return _defend("fst", data, seed=effect_seed, epochs=5, batch_size=64)


def test_fst_removes_the_backdoor(fst, record):
    repaired, before, after, _ = fst
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    assert before["asr"] > 0.9
    # seeds 0/1/2: ASR 0.004 / 0.000 / 0.001, ACC drop 0.17 / 0.18 / 0.16
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.25, (before, after)


def test_the_retuning_attack_reactivates_the_backdoor_fst_removed_faster_than_a_clean_model_learns_it(
        data, fst, effect_seed, record):
    """Min et al.'s reactivation check (nadbench.engine.reactivation) on ~900 training images, 5 of them
    poisoned. (In an exploratory run, not committed, fine-pruning without its finetuning went from 22 %
    to 97.8 %.)"""
    from nadbench.engine.reactivation import retune, retuning_set

    from conftest import FIXTURE_TRAIN_LIMIT, data_root
    from nadbench.training.subsets import limit

    train, _ = get_registry().dataset("cifar10").load(data_root())
    train = limit(limit(train, FIXTURE_TRAIN_LIMIT, seed=0), 1000, seed=2)  # images the fixtures saw
    attack = get_registry().attack("badnets")()
    poisoned, rows = attack.poison_train(train, torch.Generator().manual_seed(0))
    retuning, positions = retuning_set(poisoned, rows, seed=effect_seed)
    assert len(positions) == 5 and bool((retuning.labels[positions] == 5).all())
    _, test, triggered = data
    repaired, _, after, _ = fst
    again = evaluate(retune(repaired.model, retuning, positions, attack, seed=effect_seed), test, triggered, 5)
    clean = evaluate(retune(fixture_model("clean"), retuning, positions, attack, seed=effect_seed), test, triggered, 5)
    record(asr=after["asr"], retuned_asr=again["asr"], clean_retuned_asr=clean["asr"],
           margin=again["asr"] - clean["asr"])
    # seeds 0/1/2: FST's ASR retuned 0.27 / 0.38 / 0.29, the clean model's 0.01 / 0.07 / 0.03
    assert after["asr"] < 0.2 and again["asr"] > clean["asr"] + 0.1, (after, again, clean)


def test_ft_sam_weakens_the_backdoor_at_its_own_learning_rate(data, effect_seed, record):
    """3 epochs at batch 32: 96 updates."""
    repaired, before, after, _ = _defend("ft-sam", data, seed=effect_seed, epochs=3, batch_size=32)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    assert before["asr"] > 0.9
    # seeds 0/1/2: ASR 0.49 / 0.38 / 0.47, ACC drop 0.060 / 0.080 / 0.054
    assert after["asr"] < 0.7 and after["acc"] > before["acc"] - 0.1, (before, after)


# ANP, RNP, I-BAU, Neural Cleanse and SAU start from a stronger model: on the 71 %-ACC fixture the held-out
# rule of ANP and RNP prunes nothing (no neuron clean accuracy can spare; benchmarks/results/
# defenses-fixture.md). tests/fixtures/badnets-quick-wrn16-1.safetensors is the quick profile's BadNets
# model (`bench attack --attack badnets --profile quick --seed 0 --output ...`, bf16 on an AMD EPYC with
# AVX512-BF16: ACC 81.90, ASR 100 on the test split), repaired with the same 1,000 clean images (Neural
# Cleanse: 300), at settings shortened for CI where the defense iterates (named in each test; the grid
# runs the quick profile's). Before: ASR 100, ACC 83.0 on the 1,000 test images.
QUICK = "badnets-quick"


def test_anp_prunes_the_neurons_perturbations_expose_and_removes_the_backdoor(data, effect_seed, record):
    repaired, before, after, logged = _defend("anp", data, model=QUICK, seed=effect_seed, iterations=100)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"], pruned=logged["anp.pruned"][0],
           threshold=logged["anp.threshold"][0])
    assert before["asr"] > 0.9 and logged["anp.pruned"][0] > 0
    # seeds 0/1/2: ASR 0.19 / 0.00 / 0.57 (23 / 34 / 17 neurons pruned), ACC drop 0.09 / 0.07 / 0.05 on a
    # Xeon with AMX; ASR 0.11 / 0.02 / 0.54 (18 / 27 / 12), ACC drop 0.07 / 0.04 / 0.03 on an AMD EPYC. At
    # 100 iterations the held-out rule's choice varies with the seed: one seed in three leaves half the
    # backdoor (the bound of 0.3 measured at one seed failed on another CPU kind).
    assert after["asr"] < 0.75 and after["acc"] > before["acc"] - 0.15, (before, after)


def test_rnp_removes_the_backdoor_by_the_neurons_unlearning_exposes(data, effect_seed, record):
    """The authors' pruning rule (masks at most 0.2). The held-out rule, the grid's default, pruned
    nothing at one seed in three here (seeds 0/1/2: ASR 0.00 / 0.02 / 1.00): no bound a no-op fails
    holds it. 10 recovering epochs (the authors': 20)."""
    repaired, before, after, logged = _defend("rnp", data, model=QUICK, seed=effect_seed, rule="threshold",
                                              recovering_epochs=10)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    assert before["asr"] > 0.9
    # seeds 0/1/2: ASR 0.00 / 0.00 / 0.00 for ACC drops of 0.09 / 0.26 / 0.09
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.35, (before, after)


def test_ibau_unlearns_the_backdoor_in_one_round(data, effect_seed, record):
    """One round, 3 fixed-point iterations of the hypergradient (the authors': 5)."""
    repaired, before, after, _ = _defend("i-bau", data, model=QUICK, seed=effect_seed, rounds=1, fixed_point_steps=3)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    assert before["asr"] > 0.9
    # I-BAU's cost in accuracy is its known weakness on these short-trained models (the grid: Trojan
    # 0.01 / 47.68), stated rather than hidden. seeds 0/1/2: ASR 0.02 / 0.02 / 0.01, ACC drop 0.27 /
    # 0.32 / 0.28 (as with 5 fixed-point iterations)
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.35, (before, after)


def test_neural_cleanse_flags_the_target_and_unlearns_its_inverted_trigger(data, effect_seed, record):
    """10 inversion epochs per class on 300 images, 10 unlearning epochs."""
    clean, _ = real_subset(300, 1)
    repaired, before, after, logged = _defend("neural-cleanse", data, model=QUICK, clean=clean, seed=effect_seed,
                                              epochs=10, unlearn_epochs=10, batch_size=64)
    index = logged["nc.anomaly_index"]
    record(target_index=index[5], asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    # seeds 0/1/2 (the inversion on the one loop, seeded per class; a Xeon with AMX): the target's index
    # 3.64 / 5.71 / 3.77 (NC flags above 2; before, with one generator for all classes, 4.39 / 2.01 / 3.45;
    # with 150 images at batch 32 seed 0 gave 1.56, and 6 inversion epochs 0.33 at seed 1), ASR 0.06 / 0.03 /
    # 0.02, ACC drop 0.05 / 0.04 / 0.04
    assert before["asr"] > 0.9 and index[5] > 2  # BadNets' target, 5
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.1, (before, after)


def test_sau_weakens_the_backdoor_in_one_round(data, effect_seed, record):
    """One round at batch 32 (the authors': 100 at 256): 32 updates of Adam at 1e-4."""
    repaired, before, after, _ = _defend("sau", data, model=QUICK, seed=effect_seed, rounds=1, batch_size=32)
    record(asr=after["asr"], acc_drop=before["acc"] - after["acc"])
    assert before["asr"] > 0.9
    # seeds 0/1/2: ASR 0.64 / 0.66 / 0.62, ACC drop 0.07 / 0.06 / 0.06
    assert after["asr"] < 0.85 and after["acc"] > before["acc"] - 0.1, (before, after)
