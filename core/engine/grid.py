"""What a grid is made of: its cells and the profiles that say how backdoored models are trained.
No torch here: the CLI, the table and the executors use these without loading it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..contract import config as cfgmod
from ..contract.config import param


@dataclass(frozen=True)
class Profile:
    """How the backdoored models are trained and how much data a cell uses. Defenses keep their
    own (paper) settings in every profile except the fields they declare in ``profile_settings``
    (the engine applies those); override anything with ``--set nad.epochs=...``."""

    name: str = param("custom", "profile name")
    epochs: int = param(100, "backdoor training epochs", min=1)
    lr: float = param(0.1, "backdoor training peak learning rate", min=0.0)
    schedule: str = param("step", "learning-rate schedule", choices=("step", "cosine", "onecycle"))
    milestones: tuple[int, ...] = param((50, 75), "epochs of 10x lr drops (step schedule)", min=0)
    batch_size: int = param(64, "backdoor training batch size", min=1)
    weight_decay: float = param(1e-4, "backdoor training weight decay", min=0.0)
    crop: int = param(4, "random-crop padding for backdoor training (0: off)", min=0)
    flip: bool = param(True, "random flips for backdoor training")
    clean_share: float = param(0.05, "share of the training set the defender holds", min=0.0, max=1.0,
                               min_exclusive=True)
    train_limit: int | None = param(None, "use a random subset of this many training images", min=1)
    test_limit: int | None = param(None, "use a random subset of this many test images", min=1)
    # Reaches the defenses that declare it (``profile_settings = {"lr": "finetune_lr"}``); --set wins.
    finetune_lr: float | None = param(None, "initial lr of the finetuning-style defenses that take it "
                                      "(profile_settings; none: each defense's own default)", min=0.0, max=10.0)
    # Detection cells only: how many clean test images and as many triggered ones an input detector
    # screens (seeded subsets; none: all), as test_limit bounds a cell's evaluation.
    detect_inputs: int | None = param(None, "clean and triggered test images an input detector screens, each "
                                      "(none: all)", min=1)

    def backdoor_optim(self, epochs: int | None = None):
        """The training loop's ``Optim`` for the backdoored (and clean) models; ``epochs`` (an
        attack's own schedule, see ``Attack``) replaces the profile's, with the step schedule's
        milestones at the same fractions of the run."""
        from ..training.train import Optim

        milestones = self.milestones
        if epochs is not None and epochs != self.epochs:
            milestones = tuple(round(m * epochs / self.epochs) for m in milestones)
        return Optim(epochs=epochs or self.epochs, lr=self.lr, batch_size=self.batch_size, momentum=0.9,
                     nesterov=True, weight_decay=self.weight_decay, schedule=self.schedule,
                     milestones=milestones, crop=self.crop, flip=self.flip)


PROFILES = {
    # For a GPU: 100 epochs of SGD at lr 0.1 (the official code's optimiser, batch 64, weight decay
    # 1e-4), dropping 10x at epochs 50 and 75; defenses at the paper's settings.
    "paper": Profile(name="paper"),
    # Sized for BadNets x {finetune, NAD} on CIFAR-10 on a 2-core CPU (benchmarks/results/
    # table1-quick-badnets.md). A 10-epoch model is less settled than the paper's 100-epoch one: the
    # paper's finetuning lr of 0.1 costs it more ACC than in the paper, so this profile starts the
    # finetuning-style defenses that declare it (profile_settings) at 0.03, which still removes the
    # backdoor: chosen on a validation split of the training set, never the test set
    # (benchmarks/quick_lr.py, benchmarks/results/quick-lr-validation.md; tests/test_config.py).
    "quick": Profile(name="quick", epochs=10, lr=0.2, schedule="onecycle", milestones=(),
                     batch_size=128, weight_decay=5e-4, finetune_lr=0.03, detect_inputs=500),
}


def profile(name: str, overrides: dict[str, str] | None = None) -> Profile:
    if name not in PROFILES:
        raise cfgmod.ConfigError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    base = PROFILES[name]
    if not overrides:
        return base
    values = {k: getattr(cfgmod.build(Profile, {k: v}, "profile."), k) for k, v in overrides.items()}
    cfg = dataclasses.replace(base, **values)
    cfgmod.validate(cfg, "profile.")
    return cfg


def profile_values(cls: type, prof: Profile | None) -> dict:
    """The config values a profile gives a plugin, as the plugin declares (``profile_settings``)."""
    if prof is None:
        return {}
    return by_profile({field: source if isinstance(source, dict) else getattr(prof, source)
                       for field, source in cls.profile_settings.items()}, prof)


def by_profile(values: dict, prof: Profile | None) -> dict:
    """``values`` with each ``{profile name: value}`` entry taken for ``prof`` (dropped where it
    names no value for it, or ``prof`` is None); None values are dropped."""
    out = {}
    for field, value in values.items():
        if isinstance(value, dict):
            value = value.get(prof.name) if prof is not None else None
        if value is not None:
            out[field] = value
    return out


TEACHER_SOURCES = ("supplied", "scratch")


@dataclass(frozen=True)
class Cell:
    """One grid cell. ``teacher`` and ``teacher_source`` matter only to defenses with
    ``uses_teacher`` (for the others the teacher is the student and the source empty).
    ``teacher_source``: "supplied" (the supplier's model of the teacher architecture: the backdoored
    model itself, or one the engine backdoors on the same poisoned data) or "scratch" (a fresh
    network trained on the clean subset)."""

    dataset: str
    attack: str
    defense: str
    student: str
    teacher: str
    seed: int
    teacher_source: str = "supplied"
    clean_share: float | None = None  # None: the profile's (a grid without --clean-shares)
    # A detection cell's detector (its defense is then "-", NO_DEFENSE): the detector inspects the
    # cell's poisoned training set or screens inputs of its backdoored model instead of repairing it.
    detector: str = ""

    @property
    def label(self) -> str:
        arch = self.student if self.teacher == self.student else f"{self.student}<-{self.teacher}"
        if self.teacher_source == "scratch":
            arch += "(scratch)"
        share = "" if self.clean_share is None else f"/clean{self.clean_share:g}"
        method = f"detect:{self.detector}" if self.detector else self.defense
        return f"{self.dataset}/{self.attack}/{method}/{arch}{share}/seed{self.seed}"
