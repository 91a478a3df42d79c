"""`bench attack` and `bench defend`: a backdoored model as files, and the repair of a model a user
was handed. Both go through the grid's own pieces (the engine's cached backdoor training,
``apply_defense``, the one evaluation), so a repaired file means what a grid cell means.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..training import data as datamod
from ..contract.api import DatasetSpec, Split
from ..training.attention import layer_names
from ..contract.config import flatten
from ..engine.defending import measure_defended
from ..engine.runner import Cell, Runner
from ..engine.plan import NO_DEFENSE
from .userfiles import HandoverError, load_image_folder, load_model, save_image_folder
from ..training.models import save_weights
from ..engine.record import cell_run, figure_logger, log_extras, side_metrics
from ..engine.registry import Registry
from ..engine.stages import defend as defend_stage
from ..training.evaluate import accuracy, attack_evaluations, backdoor_metrics

HELD_OUT = 0.1  # share of the clean data kept for ACC when no --test data is given


# ------------------------------------------------------------------------------------ bench attack

def attack_to_files(registry: Registry, runner: Runner, *, attack: str, arch: str, dataset: str, seed: int,
                    out: Path, triggered_dir: Path) -> dict[str, Any]:
    """Train (or reuse from the cache) the grid's backdoored model and write it as safetensors, with
    the triggered test images (true labels; those whose target is their label left out) as a PNG
    ImageFolder and each one's target in its ``targets.csv``; the set of each of the attack's own
    evaluations (``Attack.evaluations``) likewise, beside it as ``<triggered_dir>-<name>``."""
    cell = Cell(dataset, attack, NO_DEFENSE, arch, arch, seed)
    model, metrics, hit = runner.backdoored(cell)
    p = runner.armed(cell)
    spec = registry.dataset(dataset)
    target = "all2all" if p.attack.all_to_all else str(p.attack.config.target)
    meta = {"nadbench.version": __version__, "arch": arch, "dataset": dataset, "seed": str(seed),
            "attack": p.attack.name, "attack.config": json.dumps(dataclasses.asdict(p.attack.config)),
            "target": target, "acc": f"{metrics['acc']:.4f}", "asr": f"{metrics['asr']:.4f}"}
    save_weights(model, out, meta)
    width = len(str(spec.num_classes - 1))
    save_image_folder(p.triggered, triggered_dir, width=width, targets=p.targets)
    evaluations = {}
    for name, (split, targets) in p.evaluations.items():
        evaluations[name] = triggered_dir.with_name(f"{triggered_dir.name}-{name}")
        save_image_folder(split, evaluations[name], width=width, targets=targets)
    return {"model": str(out), "triggered": str(triggered_dir), "n_triggered": len(p.triggered),
            "n_poisoned": len(p.index), "target": target, "cache_hit": hit, "evaluations": evaluations, **metrics}


# ------------------------------------------------------------------------------------ bench defend

@dataclass
class UserData:
    split: Split
    num_classes: int
    where: str          # what the user gave, for the report
    note: str = ""      # e.g. "resized 120 images to 32x32"
    classes: tuple[str, ...] = ()  # class names by label, where it has them (see _align)
    targets: torch.Tensor | None = None  # each image's backdoor target (a folder's targets.csv)
    named: bool = False  # labelled by class folder names, not numbers: --test/--triggered are relabelled


def load_user_data(registry: Registry, text: str, *, train: bool, image_size: int | None, seed: int,
                   data_root=None) -> UserData:
    """``name[:share]`` of a registered dataset (its training split for clean data, its test split
    otherwise; a seeded ``share``), or an ImageFolder folder/archive resized to ``image_size``."""
    name, _, share = text.partition(":")
    if name in registry.names("datasets") and not Path(text).exists():
        spec = registry.dataset(name)
        try:
            fraction = float(share) if share else 1.0
        except ValueError:
            raise HandoverError(f"{text}: the share after ':' must be a number in (0, 1]") from None
        if not 0 < fraction <= 1:
            raise HandoverError(f"{text}: the share after ':' must be in (0, 1]")
        train_set, test_set = spec.load(data_root)
        split = datamod.clean_subset(train_set if train else test_set, fraction, seed)
        return UserData(split, spec.num_classes, f"{name} {'train' if train else 'test'} split, share {fraction:g}",
                        classes=spec.classes)
    if not Path(text).exists():
        raise HandoverError(f"{text}: neither a folder or archive nor a registered dataset "
                            f"(valid: {', '.join(registry.names('datasets'))}, as NAME or NAME:SHARE)")
    split, classes, resized, targets = load_image_folder(text, image_size or 32, targets=True)
    numeric = all(c.isdigit() for c in classes)
    n_classes = int(split.labels.max()) + 1 if numeric else len(classes)
    note = f"resized {resized} of {len(split)} images to {image_size or 32}x{image_size or 32}" if resized else ""
    return UserData(split, n_classes, text, note, classes=() if numeric else tuple(classes), named=not numeric,
                    targets=targets)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Measured:
    """The user's data as ``bench defend`` uses it: what the defense sees (``clean``), ACC's test set,
    the triggered images with their targets (ASR), an attack's own evaluations, and notes on what
    was derived (a held-out slice, left-out images)."""

    clean: Split
    test: Split
    triggered: tuple[Split, torch.Tensor] | None
    evaluations: dict[str, tuple[Split, torch.Tensor]]
    notes: list[str]

    def to(self, device: torch.device) -> "Measured":
        move = lambda pair: (pair[0].to(device), pair[1].to(device))  # noqa: E731
        return Measured(self.clean.to(device), self.test.to(device), self.triggered and move(self.triggered),
                        {name: move(pair) for name, pair in self.evaluations.items()}, self.notes)

    def measure(self, model) -> dict[str, float]:
        """ACC, and ASR/RA and the evaluations where there are triggered images: the one evaluation."""
        result = {"acc": accuracy(model, self.test)}
        if self.triggered is not None:
            result.update(backdoor_metrics(model, *self.triggered))
        return {**result, **attack_evaluations(model, self.evaluations)}


def measured_data(clean: UserData, test: UserData | None, triggered: UserData | None, target: int | None,
                  evaluations: dict[str, UserData], seed: int) -> Measured:
    """The sets of :class:`Measured` from what the user gave: without ``test``, ACC on a held-out
    seeded slice of the clean data, which the defense then never sees."""
    clean_split, notes = clean.split, [n for n in (clean.note,) if n]
    if test is None:
        order = torch.randperm(len(clean_split), generator=torch.Generator().manual_seed(seed))
        n_out = max(1, round(HELD_OUT * len(clean_split)))
        test_split = clean_split.subset(order[:n_out].sort().values)
        clean_split = clean_split.subset(order[n_out:].sort().values)
        notes.append(f"ACC on a held-out {HELD_OUT:.0%} of the clean data ({n_out} images), which the defense "
                     "did not see")
    else:
        test = _align(test, clean, "--test")
        test_split = test.split
        notes += [n for n in (test.note,) if n]
    asr = _triggered(triggered, clean, target, "--triggered", "ASR", notes) if triggered is not None else None
    # an evaluation's own targets.csv first: its targets may differ from the ASR set's
    extra = {name: _triggered(data, clean, target if data.targets is None else None, f"--evaluation {name}",
                              f"attack.{name}", notes) for name, data in evaluations.items()}
    return Measured(clean_split, test_split, asr, extra, notes)


def defend_file(registry: Registry, *, model_path: Path, arch: str, clean: UserData | None, defense_name: str,
                overrides: dict[str, str], mean, std, test: UserData | None, triggered: UserData | None,
                target: int | None, teacher_path: Path | None, teacher_arch: str | None, seed: int,
                device: torch.device, out: Path, make_tracker=None, progress: bool = True,
                evaluations: dict[str, UserData] | None = None) -> dict[str, Any]:
    """Repair ``model_path`` with a registered defense, evaluate it before and after on the user's data
    (``clean`` None: a data-free defense, evaluated on ``test``; ``evaluations``: an attack's own sets,
    as `bench attack` writes them, reported as ``attack.<name>``), write the repaired weights and a
    report, and record it all as one MLflow run, as a grid cell is (``record.cell_run``).
    ``make_tracker()`` is called once every input has been checked: a bad input fails in seconds."""
    start_all = time.perf_counter()
    if clean is None:  # a data-free defense: the test data names the classes, the defense gets no image
        if test is None:
            raise HandoverError("without --clean (a data-free defense), ACC needs --test")
        clean = dataclasses.replace(test, split=test.split.subset(torch.zeros(0, dtype=torch.long)),
                                    where="none (data-free defense)", note="")
    spec, model, teacher_spec, supplied, dataset = _handed(registry, model_path, arch, teacher_path, teacher_arch,
                                                           clean, mean, std, device)
    defense = registry.defense(defense_name).from_overrides(overrides)
    defense.check(defend_stage.layers_of(registry, dataset, spec.name, model),
                  defend_stage.layers_of(registry, dataset, teacher_spec.name, supplied.get(teacher_spec.name)))
    data = measured_data(clean, test, triggered, target, evaluations or {}, seed)
    on_device = data.to(device)
    tracker = make_tracker() if make_tracker else None
    before = on_device.measure(model)
    input_sha256 = sha256_of(model_path)
    params = {"model.path": str(model_path), "model.sha256": input_sha256, "model.student": arch,
              "model.teacher": teacher_spec.name, "teacher.path": str(teacher_path or ""),
              "defense.name": defense_name, "defense.provider": defense.provider, "seed": seed,
              "device": str(device), "data.clean": clean.where, "data.n_clean": len(data.clean),
              "data.test": test.where if test else "held-out clean slice", "data.n_test": len(data.test),
              "data.triggered": triggered.where if triggered else "",
              "data.evaluations": ", ".join(f"{n}={d.where}" for n, d in (evaluations or {}).items()),
              "attack.target": target if target is not None else "targets.csv" if triggered else "",
              "nadbench.version": __version__, **flatten(defense.config, "defense")}
    with cell_run(tracker, f"bench defend {model_path.name}", params, None, None) as (t, run_id, log):
        if t:
            t.metrics(run_id, {f"before.{k}": v for k, v in before.items()})
        ctx = defend_stage.context(registry, dataset, student=spec.name, teacher=teacher_spec.name, seed=seed,
                                   device=device, supplied=supplied, log_metric=log,
                                   log_figure=figure_logger(t, run_id), progress=progress)
        original = copy.deepcopy(model)
        repaired, seconds = defend_stage.defend(defense, model, on_device.clean, ctx)
        measured = measure_defended(repaired, on_device.measure, before)  # after (with DER), extras, side models
        save_weights(repaired.model, out, {
            "nadbench.version": __version__, "defense": defense_name,
            "defense.config": json.dumps(dataclasses.asdict(defense.config)), "input.sha256": input_sha256,
            "arch": arch})
        report = {"model": str(model_path), "repaired": str(out), "defense": defense_name, "arch": arch,
                  "before": before, "after": measured["after"], "time_defense_s": seconds,
                  "time_total_s": time.perf_counter() - start_all, "n_clean": len(data.clean),
                  "n_test": len(data.test), "n_triggered": len(data.triggered[0]) if data.triggered else 0,
                  "n_evaluations": {name: len(split) for name, (split, _) in data.evaluations.items()},
                  "notes": data.notes, **measured}
        figure = _attention(original, repaired.model, spec, data, out, report, f"{defense_name} on {model_path.name}")
        out.with_suffix(".report.json").write_text(json.dumps(report, indent=2))
        if t:
            _record(t, run_id, report, repaired, figure, seconds, f"{defense_name} on {model_path.name}")
    return report


def _handed(registry: Registry, model_path: Path, arch: str, teacher_path: Path | None, teacher_arch: str | None,
            clean: UserData, mean, std, device: torch.device):
    """The model file (and a teacher file) as nadbench models on ``device``, the dataset their inputs
    imply, and what the user was handed per architecture, as a grid cell's supplier's models: the
    teacher file, else the model itself. The layers a defense taps are those of these models (or of
    what ctx.build_model makes: nadbench's wrapper, names under "net.")."""
    spec = registry.model(arch)
    model = load_model(model_path, spec, clean.num_classes, mean, std).to(device).eval()
    mean, std = tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())
    teacher_spec = registry.model(teacher_arch or arch)
    teacher = (load_model(teacher_path, teacher_spec, clean.num_classes, mean, std).to(device).eval()
               if teacher_path else None)
    dataset = DatasetSpec(clean.where, None, clean.num_classes, mean, std, image_size=int(clean.split.images.shape[-1]))
    supplied = {teacher_spec.name: teacher} if teacher is not None else {spec.name: copy.deepcopy(model)}
    return spec, model, teacher_spec, supplied, dataset


def _attention(original, defended, spec, data: Measured, out: Path, report: dict, title: str):
    """The attention maps of the model before and after, on two clean and two triggered images,
    written beside ``out`` (and named in ``report``); None for a model without attention layers."""
    from ..engine.figures import attention_figure

    layers = layer_names(defended, spec.attention_layers)
    if not layers:
        return None
    inputs = [("clean", data.test.images[:2])] + ([("triggered", data.triggered[0].images[:2])]
                                                  if data.triggered else [])
    figure = attention_figure(original, defended, layers, inputs, title=f"{title}: attention mean_c|F|^2")
    figure.savefig(out.with_suffix(".attention.png"), dpi=100)
    report["attention"] = str(out.with_suffix(".attention.png"))
    return figure


def _record(t, run_id: str, report: dict, repaired, figure, seconds: float, title: str) -> None:
    """The repair's outcome on its run: metrics, the defense's extra models, the report, figure, weights."""
    t.metrics(run_id, {**{f"after.{k}": v for k, v in report["after"].items()}, "time.defense_s": seconds,
                       **side_metrics(report.get("models"))})
    if repaired.extras:
        log_extras(t, run_id, report["extras"], title)
    t.text(run_id, json.dumps(report, indent=2), "report.json")
    if figure is not None:
        t.figure(run_id, figure, "attention/attention_maps.png")
    t.weights(run_id, repaired.model, "model/defended.safetensors")


def _triggered(data: UserData, clean: UserData, target: int | None, option: str, what: str,
               notes: list[str]) -> tuple[Split, torch.Tensor]:
    """Triggered images with the clean data's labels and each one's target (``target``, else the
    folder's targets.csv), those whose target is their own label left out."""
    data = _align(data, clean, option)
    notes += [n for n in (data.note,) if n]
    if target is None and data.targets is None:
        raise HandoverError(f"{data.where}: no --target given and no targets.csv in the folder: {what} needs "
                            "each triggered image's target")
    targets = torch.full_like(data.split.labels, target) if target is not None else data.targets  # --target wins
    keep = (targets != data.split.labels).nonzero().flatten()
    if not len(keep):
        raise HandoverError(f"{data.where}: every image's target is its own label: nothing to measure {what} on")
    return data.split.subset(keep), targets[keep]


def _align(data: UserData, clean: UserData, option: str) -> UserData:
    """``data`` with the clean data's labels. Named class folders take the labels of those names in
    the clean data (its folders' or its registered dataset's): numbered in their own sorted order, a
    folder lacking a class (triggered images without the target's) would shift every later label.
    Numbered folders and registered datasets keep their labels."""
    if data.named:
        if not clean.classes:
            raise HandoverError(f"{option} {data.where} names its class folders ({', '.join(data.classes)}) but "
                                f"the clean data's classes are numbered 0 to {clean.num_classes - 1}: name them "
                                "by number")
        unknown = [c for c in data.classes if c not in clean.classes]
        if unknown:
            raise HandoverError(f"{option} {data.where}: class {', '.join(unknown)} is not one of the clean "
                                f"data's (valid: {', '.join(clean.classes)})")
        relabel = torch.tensor([clean.classes.index(c) for c in data.classes])
        return dataclasses.replace(data, split=Split(data.split.images, relabel[data.split.labels]),
                                   num_classes=clean.num_classes, classes=clean.classes)
    if data.num_classes > clean.num_classes:
        raise HandoverError(f"{option} {data.where} has {data.num_classes} classes but the clean data has "
                            f"{clean.num_classes}")
    return data
