"""Every attack implants on real CIFAR-10 images: its poisoning (crafted against the committed clean
WRN-16-1 fixture where the attack needs a clean model: Trojan, CL) of 4,000 training images trains a
small CNN from scratch (8 epochs, ~12 s on a 2-core CPU), and the backdoor takes hold while the clean
task is learnt as well as without a trigger. The reference is a control through the same steps whose
trigger changes no pixel (dirty-label, 10 %): what relabelling alone does to ASR and ACC. A trigger
the model cannot learn, or a poisoning that does not reach the training set, stays at the control's
ASR (measured: 0.17), far below every threshold.

The implant into the paper's WRN-16-1 at each attack's published settings (quick profile, the whole
training set) is in benchmarks/results/ (``benchmarks/table1.py``, column "no defense"). The
properties that define each trigger are tested on toy data (tests/test_attacks*.py).
"""
import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import STEGASTAMP_ENCODER, fixture_model, real_subset
from nadbench import Attack, AttackContext, param
from nadbench.engine import configured
from nadbench.training.evaluate import evaluate
from nadbench.training.models import Normalized
from nadbench.engine.poisoning import craft
from nadbench.engine.registry import get_registry
from nadbench.training.train import Optim, train

pytestmark = pytest.mark.slow

# attack -> (overrides, minimum ASR). Published poison rates (10 %; the clean-label SIG and CL poison
# the whole target class, as BackdoorBench's SIG), Refool at 20 % (its reflections differ per image:
# 0.42 at 10 % here); Trojan's trigger in 150 steps instead of 500 (crafting time).
# Each minimum lies below the worst ASR of seeds 0, 1, 2 in float32 (tests/conftest.py; "seeds 0/1/2"
# below, on a 2-core Xeon with AMX: benchmarks/results/test-margins-intel-amx.md; an AMD EPYC's in
# test-margins-amd-avx512bf16.md), and far above the control's (0.18 / 0.15 / 0.17). ACC stays within
# MAX_ACC_DROP of the control's at every seed (worst: refool 0.064 below it, 0.068 on the AMD EPYC).
# The invisible triggers at their published strength do not implant in 4,000 images and 8 epochs of
# a small CNN (measured, bf16 on an AVX512-BF16 Xeon: wanet 0.23, bppattack 0.36, ftrojan 0.14,
# adaptive-blend 0.17, all-to-all badnets 0.14; 20,000 images x 3 epochs: 0.50, 0.82, 0.11, 0.29,
# 0.19), so here each runs one notch stronger, through the same code paths (WaNet's noise mode and
# BppAttack's negatives included); their defaults' implant at full scale is benchmarks/table1.py's.
# (Adaptive-blend at alpha 0.15 with twice the payload implanted in bf16 but reached 0.46 in float32:
# too close to the edge.) A model that ignores the all-to-all trigger says y + 1 on about
# (1 - ACC) / 9 = 0.05 of them.
STRONGER = {
    "wanet": ({"strength": "3"}, 0.45),  # seeds 0/1/2: 0.65 / 0.73 / 0.59
    "bppattack": ({"squeeze": "4"}, 0.7),  # 0.93 / 0.93 / 0.93 (0.89 / 0.87 / 0.87 when a negative could be its own)
    "ftrojan@aligned": ({"magnitude": "60", "poison_rate": "0.1"}, 0.8),  # 1.00 / 0.98 / 0.99
    "adaptive-blend@dense": ({"alpha": "0.3", "test_alpha": "0.3"}, 0.8),  # 1.00 / 0.98 / 0.96
    "badnets@all2all": ({"poison_rate": "0.3"}, 0.2),  # 0.33 / 0.29 / 0.32
    # IAD's generator costs more than this classifier: quarter-width networks, 30 % backdoor samples
    # per batch, 2 mask + 6 joint epochs: 0.79 / 0.90 / 0.95
    "iad": ({"width": "8", "p_attack": "0.3"}, 0.5),
}
CASES = {
    "badnets": ({}, 0.8),  # 1.00 / 1.00 / 1.00
    "blend": ({}, 0.8),  # 0.99 / 0.99 / 1.00
    "trojan": ({"steps": "150"}, 0.7),  # 0.96 / 0.95 / 0.95
    "sig": ({"poison_rate": "1.0"}, 0.7),  # 0.92 / 0.92 / 0.91
    "cl": ({"poison_rate": "1.0"}, 0.7),  # 1.00 / 1.00 / 1.00
    # dirty-label (the default, the authors' clean-label 40 % of the target class, barely implants on
    # CIFAR-10: benchmarks/results/table1-quick-refool-authors.md): 0.63 / 0.59 / 0.56
    "refool": ({"poison_rate": "0.2", "clean_label": "false"}, 0.5),
    # the suite's smaller encoder (conftest.STEGASTAMP_ENCODER), the one test_attack_stegastamp.py
    # checks, trained once (conftest.SAME_WORKER keeps the two files on one worker):
    # 0.95 / 0.90 / 0.96
    "stegastamp": ({k: str(v) for k, v in STEGASTAMP_ENCODER.items()}, 0.5),
    # the fooling rate stalls from the second pass on: 0.90 / 0.86 / 0.87
    "lf": ({"max_passes": "3"}, 0.7),
    **STRONGER,
}
SCHEDULE = Optim(epochs=8, lr=0.05, batch_size=64, schedule="onecycle", weight_decay=5e-4)
MAX_ACC_DROP = 0.08  # against the control's ACC


def small_cnn(seed: int) -> nn.Module:
    """Three conv-BN-ReLU-pool stages (16/32/64 channels) and a linear head on the 4x4 map: ~6x
    cheaper to train than WRN-16-1, and it keeps where a feature is (a corner patch)."""
    torch.manual_seed(seed)

    def stage(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    net = nn.Sequential(*stage(3, 16), *stage(16, 32), *stage(32, 64), nn.Flatten(), nn.Linear(64 * 16, 10))
    spec = get_registry().dataset("cifar10")
    return Normalized(net, spec.mean, spec.std)


@pytest.fixture(scope="module")
def data():
    """(train, test): 4,000 training images (ones the clean fixture saw), 500 test images."""
    return real_subset(4000, 500)


@pytest.fixture(scope="module")
def clean():
    return fixture_model("clean")


def implant(attack, clean, data, seed: int) -> dict:
    """Craft the attack's poisoning of the subset, train a small CNN on it from scratch, and measure
    ACC and ASR on the poisoning's own ASR set; ``seed`` seeds the crafting, the network and its training."""
    train_set, test_set = data
    reg = get_registry()
    ctx = AttackContext(dataset=reg.dataset("cifar10"), train=train_set, device=torch.device("cpu"), seed=seed,
                        clean_model=lambda: copy.deepcopy(clean), progress=False,
                        load_dataset=lambda name: real_subset(2000, 10, dataset=name))
    poisoning, _ = craft("test", attack, ctx, train_set, test_set, seed=seed)
    step = attack.train_step(poisoning.index, len(poisoning.poisoned))  # attacks that control training
    model = train(small_cnn(seed), poisoning.poisoned, SCHEDULE, seed=seed, step=step, progress=False)
    triggered = attack.trigger_test(test_set) if attack.learns_trigger else poisoning.triggered  # as the engine
    return evaluate(model, test_set, triggered, attack.targets(triggered.labels))


@dataclass(frozen=True)
class NoOpConfig:
    target: int = param(5, "target label", min=0)
    poison_rate: float = param(0.1, "share poisoned", min=0.0, max=1.0)


class NoOp(Attack):
    """Relabels like BadNets but leaves the images as they are: nothing to learn."""

    name = "no-op"
    Config = NoOpConfig

    def apply_trigger(self, images):
        return images.clone()


@pytest.fixture(scope="module")
def control(clean, data, effect_seed):
    return implant(NoOp(), clean, data, effect_seed)


def test_a_trigger_that_does_nothing_does_not_implant(control, record):
    """The thresholds mean something: relabelling alone stays far below every all-to-one one (the
    all-to-all threshold is against its own chance level, above)."""
    record(asr=control["asr"], acc=control["acc"])
    assert control["asr"] < min(m for name, (_, m) in CASES.items() if "@all2all" not in name) / 2, control


@pytest.mark.parametrize("name", list(CASES))
def test_attack_implants_on_real_data(name, clean, data, control, effect_seed, record, request):
    overrides, min_asr = CASES[name]
    attack = configured(get_registry(), "attacks", name, {f"attack.{name}": overrides})
    if name == "stegastamp":  # the encoder the session trained on these images: craft() skips its training
        shared = request.getfixturevalue("stegastamp_prepared")
        assert shared.config == attack.config
        attack = copy.copy(shared)
        attack.prepare = lambda ctx: None
    result = implant(attack, clean, data, effect_seed)
    record(asr=result["asr"], acc_over_control=result["acc"] - control["acc"])
    assert result["asr"] >= min_asr, (result, control)
    assert result["acc"] >= control["acc"] - MAX_ACC_DROP, (result, control)  # the clean task is learnt
