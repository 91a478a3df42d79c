"""The train stage: a model of one architecture trained with the profile's schedule on a clean or a
poisoned training set, and what is stored with it.

The wiring lives here, in the key: the model is initialised from the cell's seed; an attack that
controls training gives its own step over the poisoned rows, and one whose config sets ``epochs`` its
own number of epochs; an attack that learns its trigger has what it learnt checked after the first
optimiser step and stored with the model (``attack/``), with the ASR set and the sets of its own
evaluations made with it (``asr/``, ``eval/``).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .. import poisoning as poisonmod
from ...contract.api import DatasetSpec, ModelSpec, Split
from ...contract.config import PluginError
from ..grid import Profile
from ...training.models import build
from ..poisoning import Poisoning
from ...training.train import Optim, train


def schedule(profile: Profile, attack=None) -> Optim:
    """The profile's backdoor-training schedule, with the attack's own epochs where its config sets them."""
    return profile.backdoor_optim(getattr(attack.config, "epochs", None) if attack is not None else None)


def initial(model: ModelSpec, dataset: DatasetSpec, seed: int, device: torch.device) -> torch.nn.Module:
    """A model of ``model``'s architecture, initialised from ``seed``."""
    torch.manual_seed(seed)
    return build(model, dataset, device)


def trained(model: torch.nn.Module, data: Split, profile: Profile, *, seed: int, test_set: Split,
            attack=None, index: torch.Tensor | None = None, desc: str = "train",
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Train ``model`` (from :func:`initial`) in place on ``data`` and return what is stored: its
    state dict and, for an attack that learns its trigger, what it learnt (see the module)."""
    step = attack.train_step(index, len(data)) if attack is not None else None

    def after_step(i):  # what the attack learnt, checked after the first optimiser step
        if i == 0 and attack is not None and attack.learns_trigger:
            check_learned(attack, "after the first optimiser step")
    train(model, data, schedule(profile, attack), seed=seed, step=step, desc=desc, progress=progress,
          on_step=after_step)
    return {**model.state_dict(), **learned(attack, test_set)}


def check_learned(attack, when: str) -> dict[str, torch.Tensor]:
    """``attack.learned_state()``, refused unless it is ``dict[str, Tensor]`` (it is stored with the
    model): called after the first optimiser step too, so a wrong one fails then, not after training."""
    state = attack.learned_state()
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        got = ("{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in state.items()) + "}"
               if isinstance(state, dict) else type(state).__name__)
        raise PluginError(f"attack {attack.name!r} ({attack.provider}) breaks the plugin contract: learned_state() "
                          f"must return dict[str, Tensor] (stored with the model), and {when} it returned {got}: "
                          "return tensors, e.g. a module's state_dict() items or torch.tensor(number)")
    return state


def learned(attack, test_set: Split) -> dict[str, torch.Tensor]:
    """What ``attack`` learnt while training and the sets made with it, for an attack that learns its
    trigger; nothing for the others."""
    if attack is None or not attack.learns_trigger:
        return {}
    triggered = attack.trigger_test(test_set)
    return {**{f"attack/{k}": v.detach() for k, v in check_learned(attack, "after training").items()},
            "asr/images": triggered.images, "asr/labels": triggered.labels,
            "asr/targets": attack.targets(triggered.labels),
            **poisonmod.pack(poisonmod.evaluation_sets(attack, test_set))}


def part(entry: dict, prefix: str) -> dict:
    """The tensors of a stored model entry under ``prefix`` ("": the model's own, whose names hold no "/")."""
    if not prefix:
        return {k: v for k, v in entry.items() if "/" not in k}
    return {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}


def restore_learned(attack, entry: dict, device: torch.device) -> None:
    """Put what an attack that learns its trigger learnt (stored with its model) back into ``attack``."""
    if attack is not None and attack.learns_trigger:
        attack.load_learned_state({k: v.to(device) for k, v in part(entry, "attack/").items()})


def armed(p: Poisoning, entry: dict, device: torch.device) -> Poisoning:
    """The poisoning with the ASR set and evaluation sets its student is measured on: the poison
    stage's, or, for an attack that learns its trigger, those stored with the student's model."""
    if not p.attack.learns_trigger:
        return p
    asr = {k: v.to(device) for k, v in part(entry, "asr/").items()}
    return dataclasses.replace(p, triggered=Split(asr["images"], asr["labels"]), targets=asr["targets"],
                               evaluations=poisonmod.unpack(entry, device))


def attack_for(attack, arch: str, student: str):
    """The attack that trains the supplier's model of ``arch``: the cell's own for its student, a copy
    for another architecture (a teacher learns its own trigger, and leaves the student's alone)."""
    return attack if arch == student else copy.deepcopy(attack)
