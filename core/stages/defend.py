"""The defend stage of a cell: what the defense may reach (:func:`context`), the defense on the cell's
clean subset, the one evaluation before and after, and the reactivation check. A cell's recorded
result is keyed by this module's code closure (with the evaluation's and the defense plugin's)."""
from __future__ import annotations

from typing import Callable

import torch

from ..api import Defended, DefenseContext, Split
from ..attention import layer_names
from ..config import PluginError
from ..defending import apply_defense, measure_defended
from ..evaluate import accuracy, evaluate
from ..grid import Profile
from ..models import build, classifier_name
from ..poisoning import Poisoning
from ..reactivation import retune, retuning_set
from ..subsets import clean_subset

__all__ = ["accuracy", "attention_layers", "classifier_layer", "context", "defend", "measure", "measured",
           "retuned"]


def attention_layers(registry, arch: str, dataset: str) -> tuple[str, ...]:
    """The attention layers of a built model of ``arch``, checked to exist (a model plugin's contract)."""
    spec = registry.model(arch)
    model = build(spec, registry.dataset(dataset))
    layers = layer_names(model, spec.attention_layers)
    missing = [n for n in layers if not _has_module(model, n)]
    if missing:
        raise PluginError(f"model {arch!r} ({spec.provider}) breaks the plugin contract: its declared attention "
                          f"layers {', '.join(missing)} do not exist in the built network")
    return layers


def classifier_layer(registry, arch: str, dataset: str) -> str:
    """The final linear layer of a built model of ``arch`` ("" when it declares none), checked."""
    spec = registry.model(arch)
    return classifier_name(build(spec, registry.dataset(dataset)), spec)


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def context(registry, dataset: str, *, student: str, teacher: str, seed: int, device: torch.device,
            weights: dict[str, dict], log_metric: Callable, log_figure: Callable,
            progress: bool = True) -> DefenseContext:
    """What a cell's defense may reach: architectures, a model builder, the supplier's models (their
    state dicts in ``weights``, by architecture), attention and classifier layers, device, seed,
    logging. Nothing that loads data: its callables hold the registry, the dataset's spec and the
    weights, never the driver (whose memory holds the test split and the ASR set)."""
    spec = registry.dataset(dataset)

    def build_model(arch: str):
        return build(registry.model(arch), spec, device)

    def supplied_model(arch: str):  # a fresh copy each call
        if arch not in weights:
            return None
        model = build_model(arch)
        model.load_state_dict(weights[arch])
        return model.eval()

    return DefenseContext(
        device=device, num_classes=spec.num_classes, student=student, teacher=teacher, seed=seed,
        student_layers=attention_layers(registry, student, dataset),
        teacher_layers=attention_layers(registry, teacher, dataset),
        classifier_layer=classifier_layer(registry, student, dataset),
        build_model=build_model, supplied_model=supplied_model, log_metric=log_metric, log_figure=log_figure,
        progress=progress)


def defend(defense, model: torch.nn.Module, train_set: Split, share: float, seed: int,
           ctx: DefenseContext) -> tuple[Defended, float, int]:
    """(the repaired model, the defense's seconds, the number of clean images it got): the defense on
    the cell's clean subset, nested over shares (a seed's 1 % subset lies inside its 5 % one)."""
    clean = clean_subset(train_set, share, seed)
    repaired, seconds = apply_defense(defense, model, clean, ctx)
    return repaired, seconds, len(clean)


def measure(model: torch.nn.Module, test_set: Split, p: Poisoning) -> dict[str, float]:
    """ACC, ASR, RA and the attack's own evaluations of ``model`` (the one evaluation)."""
    return evaluate(model, test_set, p.triggered, p.targets, p.evaluations)


def measured(repaired: Defended, test_set: Split, p: Poisoning, before: dict) -> dict:
    """The repaired model's metrics, with DER against ``before`` and its side models' (``measure_defended``)."""
    return measure_defended(repaired, lambda m: measure(m, test_set, p), before)


def retuned(model: torch.nn.Module, p: Poisoning, test_set: Split, seed: int, profile: Profile,
            progress: bool = True) -> dict[str, float]:
    """The reactivation check (:mod:`nadbench.reactivation`): ACC, ASR and RA of ``model`` after the
    retuning attack on the cell's poisoning, augmented as the profile trained the backdoored model."""
    data, positions = retuning_set(p.poisoned, p.index, seed)
    model = retune(model, data, positions, p.attack, seed, profile.crop, profile.flip, progress)
    return evaluate(model, test_set, p.triggered, p.targets)
