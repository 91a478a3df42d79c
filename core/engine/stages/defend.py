"""The defend stage of a cell: what the defense may reach (:func:`context`), the defense on the cell's
clean subset, the one evaluation before and after, and the reactivation check. A cell's recorded
result is keyed by this module's code closure (with the evaluation's and the defense plugin's)."""
from __future__ import annotations

from typing import Callable

import torch

from ...contract.api import DatasetSpec, Defended, DefenseContext, Split
from ...training.attention import layer_names
from ...contract.config import PluginError
from ..defending import apply_defense, measure_defended
from ...training.evaluate import accuracy, evaluate
from ..grid import Profile
from ...training.models import build, classifier_name
from ..poisoning import Poisoning
from ..reactivation import retune, retuning_set
from ...training.subsets import clean_subset

__all__ = ["accuracy", "attention_layers", "cell", "classifier_layer", "clean_data", "context", "defend", "layers_of",
           "measure", "measured", "retuned", "supplied_archs"]


def layers_of(registry, dataset: DatasetSpec, arch: str, model: torch.nn.Module | None = None) -> tuple[str, ...]:
    """The attention layers of ``model`` (default: a model of ``arch`` built for ``dataset``), checked
    to exist (a model plugin's contract)."""
    spec = registry.model(arch)
    model = model if model is not None else build(spec, dataset)
    layers = layer_names(model, spec.attention_layers)
    missing = [n for n in layers if not _has_module(model, n)]
    if missing:
        raise PluginError(f"model {arch!r} ({spec.provider}) breaks the plugin contract: its declared attention "
                          f"layers {', '.join(missing)} do not exist in the built network")
    return layers


def attention_layers(registry, arch: str, dataset: str) -> tuple[str, ...]:
    """The attention layers of a model of ``arch`` built for the registered ``dataset``, checked."""
    return layers_of(registry, registry.dataset(dataset), arch)


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


def context(registry, dataset: DatasetSpec, *, student: str, teacher: str, seed: int, device: torch.device,
            supplied: dict[str, torch.nn.Module], log_metric: Callable, log_figure: Callable,
            progress: bool = True) -> DefenseContext:
    """What a defense may reach, in a grid cell and in ``bench defend`` alike: architectures, a model
    builder for ``dataset``, the supplier's models (``supplied``, by architecture: a fresh copy per
    call), attention layers (of the supplied model of that architecture, else of a built one) and the
    student's classifier layer, device, seed, logging. Nothing that loads data: its callables hold the
    registry, the dataset's spec and the supplied models, never the driver (whose memory holds the
    test split and the ASR set)."""
    def build_model(arch: str):
        return build(registry.model(arch), dataset, device)

    def supplied_model(arch: str):  # a fresh copy each call, built as the defense's own models are
        if arch not in supplied:
            return None
        model = build_model(arch)
        model.load_state_dict(supplied[arch].state_dict())
        return model.eval()

    spec = registry.model(student)
    return DefenseContext(
        device=device, num_classes=dataset.num_classes, student=student, teacher=teacher, seed=seed,
        student_layers=layers_of(registry, dataset, student, supplied.get(student)),
        teacher_layers=layers_of(registry, dataset, teacher, supplied.get(teacher)),
        classifier_layer=classifier_name(supplied.get(student) or build(spec, dataset), spec),
        build_model=build_model, supplied_model=supplied_model, log_metric=log_metric, log_figure=log_figure,
        progress=progress)


def supplied_archs(defense, cell) -> list[str]:
    """The architectures whose supplier's model a cell's defense gets: the teacher's when it uses a
    supplied teacher, and the student's backdoored model unless that model is its teacher."""
    uses_teacher = defense.uses_teacher
    archs = [cell.teacher] if uses_teacher and cell.teacher_source == "supplied" else []
    return archs + ([cell.student] if not (uses_teacher and cell.teacher == cell.student) else [])


def clean_data(train_set: Split, share: float, seed: int) -> Split:
    """The defender's clean subset of a cell, nested over shares (a seed's 1 % subset lies inside its 5 % one)."""
    return clean_subset(train_set, share, seed)


def defend(defense, model: torch.nn.Module, clean: Split, ctx: DefenseContext) -> tuple[Defended, float]:
    """(the repaired model, the defense's seconds): the defense run on ``model`` with ``clean``."""
    return apply_defense(defense, model, clean, ctx)


def cell(defense, model: torch.nn.Module, train_set: Split, test_set: Split, p: Poisoning, before: dict,
         share: float, seed: int, ctx: DefenseContext) -> tuple[Defended, float, int, dict]:
    """A grid cell's defend stage: the defense on the cell's clean subset of ``train_set``, then the
    repaired model measured against ``before``. Returns (repaired, seconds, clean images, metrics)."""
    clean = clean_data(train_set, share, seed)
    repaired, seconds = defend(defense, model, clean, ctx)
    return repaired, seconds, len(clean), measured(repaired, test_set, p, before)


def measure(model: torch.nn.Module, test_set: Split, p: Poisoning) -> dict[str, float]:
    """ACC, ASR, RA and the attack's own evaluations of ``model`` (the one evaluation)."""
    return evaluate(model, test_set, p.triggered, p.targets, p.evaluations)


def measured(repaired: Defended, test_set: Split, p: Poisoning, before: dict) -> dict:
    """The repaired model's metrics, with DER against ``before`` and its side models' (``measure_defended``)."""
    return measure_defended(repaired, lambda m: measure(m, test_set, p), before)


def retuned(model: torch.nn.Module, p: Poisoning, test_set: Split, seed: int, profile: Profile,
            progress: bool = True) -> dict[str, float]:
    """The reactivation check (:mod:`nadbench.engine.reactivation`): ACC, ASR and RA of ``model`` after the
    retuning attack on the cell's poisoning, augmented as the profile trained the backdoored model."""
    data, positions = retuning_set(p.poisoned, p.index, seed)
    model = retune(model, data, positions, p.attack, seed, profile.crop, profile.flip, progress)
    return evaluate(model, test_set, p.triggered, p.targets)
