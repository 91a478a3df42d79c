"""Fine-pruning and MCR on a real BadNets model: the committed fixture (tests/fixtures/), repaired
with 1,000 clean CIFAR-10 images (5% of the 20,000 it was trained on), measured on 1,000 test
images. Expected ranges were measured on it, each written so that a no-op defense fails."""
import pytest
import torch

from conftest import fixture_model, real_subset
from nadbench.api import DefenseContext
from nadbench.engine import apply_defense, attention_layers, configured
from nadbench.evaluate import evaluate, predict
from nadbench.models import build
from nadbench.registry import get_registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    """(clean subset, test subset, the ASR set of BadNets' trigger on the test subset)."""
    clean, test = real_subset(1000, 1000)
    attack = get_registry().attack("badnets")()
    return clean, test, attack.trigger_test(test)


def _defend(name, data, model="badnets", clean=None, **overrides):
    """Repair the fixture ``model`` with ``name`` on the clean subset (or ``clean``): (repaired, ASR/ACC
    before, after, what the defense logged)."""
    reg = get_registry()
    subset, test, triggered = data
    clean = subset if clean is None else clean
    model = fixture_model(model)
    before = evaluate(model, test, triggered, 5)
    layers = attention_layers(reg, "wrn-16-1", "cifar10")
    logged = {}
    ctx = DefenseContext(device=torch.device("cpu"), num_classes=10, student="wrn-16-1", teacher="wrn-16-1", seed=0,
                         student_layers=layers, teacher_layers=layers, classifier_layer="net.fc",
                         build_model=lambda arch: build(reg.model(arch), reg.dataset("cifar10")),
                         log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v), progress=False)
    defense = configured(reg, "defenses", name, {name: {k: str(v) for k, v in overrides.items()}})
    repaired, _ = apply_defense(defense, model, clean, ctx)
    after = evaluate(repaired.model, test, triggered, 5)
    print(f"{name}: before {before}, after {after}")
    return repaired, before, after, logged


def test_fine_pruning_zeroes_the_pruned_channels_and_changes_predictions(data):
    repaired, before, after, logged = _defend("fine-pruning", data, finetune="false")
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
    print(f"predictions changed on {100 * float(changed):.1f}% of the test subset")
    assert changed > 0.005
    # Selected on the held-out clean slice: its ACC stayed within 10% of the unpruned one.
    acc = logged["prune.acc"]
    assert acc[n] >= 0.9 * acc[0]


def test_mcr_point_leaves_the_straight_line_and_removes_most_of_the_backdoor(data):
    repaired, before, after, _ = _defend("mcr", data, epochs=3, curve_epochs=5, curve_points=3)
    ends = repaired.extras[0.0], repaired.extras[1.0]
    line = {n: torch.lerp(a, b, 0.3).detach() for (n, a), b in zip(ends[0].named_parameters(), ends[1].parameters())}
    with torch.no_grad():
        moved = max(float((p - line[n]).norm() / line[n].norm()) for n, p in repaired.model.named_parameters()
                    if p.ndim > 1)
    print(f"largest relative distance of a weight tensor from the straight line: {moved:.3f}")
    assert moved > 0.01  # the control point was trained: not the linear interpolation
    # Measured (float32, AVX2 CPU): ASR 1.00 before, 0.41 at t = 0.3 and 0.06 at t = 0.5, at ACC 0.66 and
    # 0.61 against 0.71; the path is 2.1% off the straight line. A no-op defense keeps ASR 1.00.
    middle = evaluate(repaired.extras[0.5], data[1], data[2], 5)
    print(f"mcr: t=0.5 {middle}")
    assert before["asr"] > 0.9
    assert after["asr"] < 0.85 and middle["asr"] < 0.4, (after, middle)
    assert after["acc"] > before["acc"] - 0.15 and middle["acc"] > before["acc"] - 0.15, (before, after, middle)



# The defenses since the paper, at their own settings but shorter where they iterate. Measured on the
# fixture (bf16, AMD EPYC with AVX512-BF16; before: ASR 100, ACC 71.1): CLP ASR 62.7 at ACC 71.1
# (3 channels pruned), FST ASR 0.2 at ACC 54.6, FT-SAM (20 epochs, batch 64) ASR 34.7 at ACC 68.9.
# A no-op defense keeps ASR 100.
def test_clp_prunes_without_data_and_weakens_the_backdoor(data):
    repaired, before, after, logged = _defend("clp", data)
    print(f"clp pruned {logged['clp.pruned_total'][0]} channels")
    assert before["asr"] > 0.9
    assert after["asr"] < 0.85 and after["acc"] > before["acc"] - 0.02, (before, after)


@pytest.fixture(scope="module")
def fst(data):
    return _defend("fst", data)


def test_fst_removes_the_backdoor(fst):
    repaired, before, after, _ = fst
    assert before["asr"] > 0.9
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.25, (before, after)


def test_the_retuning_attack_reactivates_the_backdoor_fst_removed_faster_than_a_clean_model_learns_it(data, fst):
    """Min et al.'s reactivation check (nadbench.reactivation) on ~900 training images, 5 of them
    poisoned. Measured on the fixture (bf16): FST's ASR 0.2 % -> 28.2 % after retuning; the clean
    fixture model retuned alike: 1.0 %. (In an exploratory run, not committed, fine-pruning without its
    finetuning went from 22 % to 97.8 %.)"""
    from nadbench.reactivation import retune, retuning_set

    from conftest import FIXTURE_TRAIN_LIMIT, data_root
    from nadbench.subsets import limit

    train, _ = get_registry().dataset("cifar10").load(data_root())
    train = limit(limit(train, FIXTURE_TRAIN_LIMIT, seed=0), 1000, seed=2)  # images the fixtures saw
    attack = get_registry().attack("badnets")()
    poisoned, rows = attack.poison_train(train, torch.Generator().manual_seed(0))
    retuning, positions = retuning_set(poisoned, rows, seed=0)
    assert len(positions) == 5 and bool((retuning.labels[positions] == 5).all())
    _, test, triggered = data
    repaired, _, after, _ = fst
    again = evaluate(retune(repaired.model, retuning, positions, attack, seed=0), test, triggered, 5)
    clean = evaluate(retune(fixture_model("clean"), retuning, positions, attack, seed=0), test, triggered, 5)
    print(f"FST {after} -> retuned {again}; clean model retuned {clean}")
    assert after["asr"] < 0.2 and again["asr"] > clean["asr"] + 0.1, (after, again, clean)


def test_ft_sam_weakens_the_backdoor_at_its_own_learning_rate(data):
    repaired, before, after, _ = _defend("ft-sam", data, epochs=20, batch_size=64)
    assert before["asr"] > 0.9
    assert after["asr"] < 0.7 and after["acc"] > before["acc"] - 0.08, (before, after)


# ANP, RNP, I-BAU, Neural Cleanse and SAU start from a stronger model: on the 71 %-ACC fixture the held-out
# rule of ANP and RNP prunes nothing (no neuron clean accuracy can spare; benchmarks/results/
# defenses-fixture.md). tests/fixtures/badnets-quick-wrn16-1.safetensors is the quick profile's BadNets
# model (`bench attack --attack badnets --profile quick --seed 0 --out ...`, bf16 on an AMD EPYC with
# AVX512-BF16: ACC 81.90, ASR 100 on the test split), repaired with the same 1,000 clean images (Neural
# Cleanse: 300), at settings shortened for CI where the defense iterates (named in each test; the grid
# runs the quick profile's). Measured on the 1,000 test images (before: ASR 100, ACC 83.0), float32 on
# this CPU (the AVX2 kind's precision), ASR at ACC: ANP 10.9 at 76.1 (18 neurons pruned), RNP 0.0 at
# 74.1, I-BAU 2.0 at 55.0, Neural Cleanse 3.2 at 77.0 (anomaly index of the target 4.4), SAU 60.4 at
# 78.8; in bf16 ANP 2.1 at 74.7, RNP 0.0 at 74.2, I-BAU 1.8 at 55.0, Neural Cleanse 3.2 at 76.9 (4.5),
# SAU 58.7 at 78.1. A no-op defense keeps ASR 100.
QUICK = "badnets-quick"


def test_anp_prunes_the_neurons_perturbations_expose_and_removes_the_backdoor(data):
    repaired, before, after, logged = _defend("anp", data, model=QUICK, iterations=100)
    print(f"anp pruned {logged['anp.pruned'][0]} neurons at threshold {logged['anp.threshold'][0]}")
    assert before["asr"] > 0.9 and logged["anp.pruned"][0] > 0
    assert after["asr"] < 0.3 and after["acc"] > before["acc"] - 0.15, (before, after)


def test_rnp_removes_the_backdoor_by_the_neurons_unlearning_exposes(data):
    repaired, before, after, logged = _defend("rnp", data, model=QUICK)
    assert before["asr"] > 0.9
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.15, (before, after)


def test_ibau_unlearns_the_backdoor_in_one_round(data):
    repaired, before, after, _ = _defend("i-bau", data, model=QUICK, rounds=1)
    assert before["asr"] > 0.9
    # I-BAU's cost in accuracy is its known weakness on these short-trained models (the grid: Trojan
    # 0.01 / 47.68), stated rather than hidden
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.35, (before, after)


def test_neural_cleanse_flags_the_target_and_unlearns_its_inverted_trigger(data):
    clean, _ = real_subset(300, 1)
    repaired, before, after, logged = _defend("neural-cleanse", data, model=QUICK, clean=clean, epochs=10,
                                              unlearn_epochs=20, batch_size=64)
    index = logged["nc.anomaly_index"]
    print(f"anomaly indices {[round(v, 2) for v in index]}")
    assert before["asr"] > 0.9 and index[5] > 2  # BadNets' target, 5
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.1, (before, after)


def test_sau_weakens_the_backdoor_in_two_rounds(data):
    """Two rounds at batch 64 (the authors': 100 at 256): 32 updates of Adam at 1e-4."""
    repaired, before, after, _ = _defend("sau", data, model=QUICK, rounds=2, batch_size=64)
    assert before["asr"] > 0.9
    assert after["asr"] < 0.85 and after["acc"] > before["acc"] - 0.1, (before, after)
