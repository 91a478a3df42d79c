"""The grid runner: expands datasets x attacks x defenses x student/teacher x seeds into cells and
runs each one the same way: poison, train (or reuse) the backdoored model, evaluate, defend,
evaluate again, log everything to MLflow.

The defense sees only the model and the clean subset; the engine alone evaluates ACC and ASR.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import config as cfgmod
from . import data as datamod
from . import poisoning as poisonmod
from .api import AttackContext, DefenseContext, Split
from .attention import layer_names
from .codehash import code_hash
from .defending import RESERVED_PREFIXES, apply_defense, measure_defended  # noqa: F401 — re-exported
from .evaluate import accuracy, evaluate
from .grid import PROFILES, TEACHER_SOURCES, Cell, Profile, profile, profile_values  # noqa: F401 — re-exported
from .models import build, classifier_name
from .poisoning import Poisoning
from .registry import PluginError, Registry
from .store import Store, stage_key
from .subsets import clean_subset
from .train import numerics, train

# Stage folders under the cache (``$NADBENCH_CACHE``, default ~/.cache/nadbench).
MODELS_DIR = "models"   # trained models (clean, backdoored, supplied teachers)
POISON_DIR = "poison"   # poisonings: changed training rows, the ASR set, what the attack logged

# The core modules that compute each stage's output; their sources (and their imports within
# nadbench, see core/codehash.py) are in the stage's key, beside the plugins' own code.
POISON_CODE = ("nadbench.poisoning",)
TRAIN_CODE = ("nadbench.train", "nadbench.models", "nadbench.grid")
CELL_CODE = ("nadbench.defending", "nadbench.evaluate", "nadbench.subsets")
KIND_PREFIX = {"attacks": "attack", "defenses": "defense"}


def overrides_for(overrides: dict[str, dict], registry: Registry, kind: str, name: str) -> dict:
    """The ``--set`` overrides of one attack or defense (by its plain ``name``): those addressed to
    its kind (``attack.NAME`` / ``defense.NAME`` keys) over those addressed by the plain name, which
    are refused when an attack and a defense share that name."""
    plain = overrides.get(name) or {}
    other = "defenses" if kind == "attacks" else "attacks"
    if plain and (name in registry.items[other] or name in registry.ambiguous[other]):
        raise cfgmod.ConfigError(f"--set {name}.FIELD is ambiguous: {name!r} names an attack and a defense; "
                                 f"write attack.{name}.FIELD or defense.{name}.FIELD")
    return {**plain, **(overrides.get(f"{KIND_PREFIX[kind]}.{name}") or {})}


def configured(registry: Registry, kind: str, name: str, overrides: dict[str, dict] | None = None,
               prof: Profile | None = None):
    """An attack or defense with its config: its defaults, then what the profile sets for it, then
    the user's ``--set`` overrides. Raises ``ConfigError`` for an invalid value."""
    cls = registry.get(kind, name)
    values = {**profile_values(cls, prof), **overrides_for(overrides or {}, registry, kind, cls.name)}
    return cls.from_overrides(values)


def check_target(attack, dataset) -> None:
    """An attack's target must be a label of the dataset (checked before anything trains)."""
    target, n = attack.config.target, dataset.num_classes
    if not 0 <= target < n:
        raise cfgmod.ConfigError(f"{attack.name}.target = {target} is out of range for dataset {dataset.name!r}, "
                                 f"which has {n} classes: valid targets are 0..{n - 1}")


def attention_layers(registry: Registry, arch: str, dataset: str) -> tuple[str, ...]:
    """The attention layers of a built model of ``arch``, checked to exist (a model plugin's contract)."""
    spec = registry.model(arch)
    model = build(spec, registry.dataset(dataset))
    layers = layer_names(model, spec.attention_layers)
    missing = [n for n in layers if not _has_module(model, n)]
    if missing:
        raise PluginError(f"model {arch!r} ({spec.provider}) breaks the plugin contract: its declared attention "
                          f"layers {', '.join(missing)} do not exist in the built network")
    return layers


def classifier_layer(registry: Registry, arch: str, dataset: str) -> str:
    """The final linear layer of a built model of ``arch`` ("" when it declares none), checked."""
    spec = registry.model(arch)
    return classifier_name(build(spec, registry.dataset(dataset)), spec)


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def check_grid(registry: Registry, cells: list[Cell], overrides: dict[str, dict[str, str]],
               prof: Profile | None = None) -> None:
    """Everything that can be checked before anything trains: every plugin config (with the profile's
    settings and the overrides the Runner will use), every attack's target against its dataset, every
    model's attention layers, and every defense against its student/teacher pair (NAD: one beta per
    attention layer). Raises ``ConfigError`` or ``PluginError``."""
    layers: dict[tuple[str, str], tuple[str, ...]] = {}

    def layers_of(arch, dataset):
        if (arch, dataset) not in layers:
            layers[arch, dataset] = attention_layers(registry, arch, dataset)
        return layers[arch, dataset]

    for cell in cells:
        check_target(configured(registry, "attacks", cell.attack, overrides, prof), registry.dataset(cell.dataset))
        defense_cls = registry.defense(cell.defense)
        defense = configured(registry, "defenses", cell.defense, overrides, prof)
        defense.check(layers_of(cell.student, cell.dataset), layers_of(cell.teacher, cell.dataset))
        if defense_cls.uses_classifier and not classifier_layer(registry, cell.student, cell.dataset):
            raise cfgmod.ConfigError(f"defense {defense_cls.name!r} prunes the inputs of the model's classifier "
                                     f"layer, and {cell.student!r} declares none (ModelSpec.classifier_layer)")


def provenance(registry: Registry, cell: Cell) -> dict[str, str]:
    """Who provided each part of a cell (distribution and version, source hash), and nadbench itself."""
    from . import __version__

    parts = {"dataset": registry.dataset(cell.dataset), "attack": registry.attack(cell.attack),
             "defense": registry.defense(cell.defense), "model.student": registry.model(cell.student),
             "model.teacher": registry.model(cell.teacher)}
    params = {"nadbench.version": __version__, "nadbench.git_commit": git_commit() or "unknown"}
    for key, item in parts.items():
        params[f"{key}.provider"] = item.provider
        params[f"{key}.source_hash"] = item.source_hash[:16]
    return params


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the nadbench checkout, when it is one (an editable install); None otherwise."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def expand(registry: Registry, datasets, attacks, defenses, students, teachers, seeds,
           teacher_sources=("supplied",), clean_shares=None) -> list[Cell]:
    """All cells of the grid. Teacher architectures and teacher sources multiply only the defenses
    that use a teacher (``Defense.uses_teacher``); the others get one cell with teacher = student.
    ``clean_shares`` (None: the profile's share) multiplies every defense."""
    cells = []
    for d, a, de, s, share, seed in itertools.product(datasets, attacks, defenses, students,
                                                      clean_shares or [None], seeds):
        if registry.defense(de).uses_teacher:
            for t, src in itertools.product(teachers or [s], teacher_sources or ("supplied",)):
                cells.append(Cell(d, a, de, s, t, seed, src, share))
        else:
            cells.append(Cell(d, a, de, s, s, seed, "", share))
    return cells


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("--device cuda asked for, but torch sees no CUDA device; valid: auto, cpu")
    return device


class Runner:
    """Runs cells as content-keyed stages (see ``core/store.py``): poison -> train (the backdoored
    model, and the clean one an attack may craft against) -> defend -> evaluate. Each stage is
    computed once per key, across processes, and kept in memory for the cells of this process.

    ``overrides``: ``--set`` values per plugin, keyed ``attack.NAME`` / ``defense.NAME`` (or by the
    plain name, when no attack and defense share it); they win over the profile's settings."""

    def __init__(self, registry: Registry, prof: Profile, *, device: torch.device, data_root=None,
                 overrides: dict[str, dict[str, str]] | None = None, tracker=None, progress=True,
                 cache_dir: Path | None = None, clean_reference: bool = False, rerun: str | None = None):
        self.registry, self.profile, self.device = registry, prof, device
        self.data_root, self.tracker, self.progress = data_root, tracker, progress
        self.overrides = overrides or {}
        self.clean_reference = clean_reference
        self.rerun = rerun  # None | "cells" (defend + evaluate again) | "all" (every stage again)
        self.cache_root = Path(cache_dir or datamod.cache_dir())
        self.store = Store(self.cache_root)
        self._loaded: dict[str, tuple] = {}      # dataset -> (train, test, digests), on the CPU
        self._data: dict[str, tuple] = {}
        self._poison: dict[str, Poisoning] = {}
        self._models: dict[str, dict] = {}       # train key -> state dict
        self._metrics: dict[tuple, dict] = {}

    # -- keys: every input that changes a stage's output, nothing else --------------------------
    def _dataset_part(self, name: str, *splits: str) -> dict[str, Any]:
        """The data a stage reads, by content: digests of the (limited) splits it uses."""
        digests = self._load(name)[2]
        return {"name": name, **{split: digests[split] for split in splits}}

    def train_key(self, dataset: str, arch: str, seed: int, poison: str | None) -> tuple[str, str]:
        """A model of ``arch`` trained with the profile's schedule on the clean training set
        (``poison`` None) or on the poisoning with that key."""
        spec = self.registry.model(arch)
        prof = dataclasses.asdict(self.profile)
        for k in ("name", "clean_share", "finetune_lr", "test_limit"):  # no effect on the weights
            prof.pop(k)
        return stage_key("train", {
            "data": self._dataset_part(dataset, "train"), "poison": poison, "model": arch,
            "model_plugin": [spec.provider, spec.source_hash], "code": code_hash(*TRAIN_CODE),
            "device": self.device.type, "precision": numerics(self.device), "seed": seed, "profile": prof})

    def _attack_obj(self, name: str):
        return configured(self.registry, "attacks", name, self.overrides, self.profile)

    def _defense_obj(self, name: str):
        return configured(self.registry, "defenses", name, self.overrides, self.profile)

    def poison_key(self, cell: Cell) -> tuple[str, str]:
        attack = self._attack_obj(cell.attack)
        parts = {"data": self._dataset_part(cell.dataset, "train", "test"), "attack": attack.name,
                 "config": cfgmod.key_values(attack.config), "plugin": [attack.provider, attack.source_hash],
                 "code": code_hash(*POISON_CODE), "seed": cell.seed, "clean_model": None}
        if attack.uses_clean_model:  # crafted against the clean model of the student architecture
            parts["clean_model"] = self.train_key(cell.dataset, cell.student, cell.seed, None)[0]
        return stage_key("poison", parts)

    def teacher_key(self, cell: Cell) -> str | None:
        """The train key of the supplied teacher, when the cell needs one other than the student."""
        if not (self.registry.defense(cell.defense).uses_teacher and cell.teacher_source == "supplied"
                and cell.teacher != cell.student):
            return None
        return self.train_key(cell.dataset, cell.teacher, cell.seed, self.poison_key(cell)[0])[0]

    def cell_key(self, cell: Cell) -> tuple[str, str]:
        """Everything a cell's recorded result depends on: its backdoored model, the defense (config
        and code), the teacher, the clean subset, the test data and the evaluation's code."""
        defense = self._defense_obj(cell.defense)
        teacher = self.registry.model(cell.teacher)
        return stage_key("cell", {
            "model": self.train_key(cell.dataset, cell.student, cell.seed, self.poison_key(cell)[0])[0],
            "defense": defense.name, "config": cfgmod.key_values(defense.config),
            "plugin": [defense.provider, defense.source_hash], "code": code_hash(*CELL_CODE),
            "teacher": [cell.teacher, cell.teacher_source, teacher.provider, teacher.source_hash],
            "teacher_model": self.teacher_key(cell), "clean_share": self.clean_share(cell),
            "test": self._dataset_part(cell.dataset, "test"), "clean_reference": self.clean_reference,
            "device": self.device.type})

    def clean_share(self, cell: Cell) -> float:
        return self.profile.clean_share if cell.clean_share is None else cell.clean_share

    # -- stages, each stored by key and kept in memory ----------------------------------------
    def _load(self, name: str) -> tuple:
        """(train, test, digests) of a dataset as the profile limits it, on the CPU: keys need the
        digests before any stage runs (the driver of a grid with workers never trains)."""
        if name not in self._loaded:
            train_set, test_set = self.registry.dataset(name).load(self.data_root)
            train_set = datamod.limit(train_set, self.profile.train_limit, seed=0)
            test_set = datamod.limit(test_set, self.profile.test_limit, seed=0)
            self._loaded[name] = (train_set, test_set,
                                  {"train": datamod.digest(train_set), "test": datamod.digest(test_set)})
        return self._loaded[name]

    def data(self, name: str):
        if name not in self._data:
            train_set, test_set, _ = self._load(name)
            self._data[name] = (self.registry.dataset(name), train_set.to(self.device), test_set.to(self.device))
        return self._data[name]

    def poisoning(self, cell: Cell) -> Poisoning:
        """The poison stage of (attack config, dataset, seed[, clean model]): crafted once, stored."""
        key, text = self.poison_key(cell)
        if key not in self._poison:
            spec, train_set, test_set = self.data(cell.dataset)
            attack = self._attack_obj(cell.attack)
            with self.store.lock(POISON_DIR, key):
                entry = self.store.load_tensors(POISON_DIR, key, text)
                if entry is not None:
                    self._poison[key] = poisonmod.restore(key, attack, train_set, entry[0], self.device)
                else:
                    self._poison[key] = self._craft(cell, key, text, attack, spec, train_set, test_set)
        return self._poison[key]

    def _craft(self, cell, key, text, attack, spec, train_set, test_set) -> Poisoning:
        def clean_model():
            if not attack.uses_clean_model:
                raise PluginError(f"attack {attack.name!r} ({attack.provider}) calls ctx.clean_model() but does not "
                                  "declare uses_clean_model = True (its poisoning depends on that model, so the "
                                  "engine must key the stored poisoning by it)")
            return self.clean_model(cell)[0]

        ctx = AttackContext(dataset=spec, train=train_set, device=self.device, seed=cell.seed, clean_model=clean_model,
                            load_dataset=lambda name: self.registry.dataset(name).load(self.data_root),
                            progress=self.progress)
        poisoning, tensors = poisonmod.craft(key, attack, ctx, train_set, test_set, cell.seed)
        self.store.save_tensors(POISON_DIR, key, text, tensors, {"attack": attack.name})
        return poisoning

    def attack(self, cell: Cell):
        """(attack, poisoned train set, poisoned indices, ASR set, images the attack logged)."""
        p = self.poisoning(cell)
        return p.attack, p.poisoned, p.index, p.triggered, p.images

    def _trained(self, dataset: str, arch: str, seed: int, poison: str | None, data, desc: str):
        """The train stage: a model of ``arch`` trained on ``data()`` (a callable, so a cache hit
        never builds the data). Returns (model in eval mode, cache hit)."""
        key, text = self.train_key(dataset, arch, seed, poison)
        spec = self.registry.dataset(dataset)
        torch.manual_seed(seed)
        model = build(self.registry.model(arch), spec, self.device)
        if key in self._models:
            model.load_state_dict(self._models[key])
            return model.eval(), True
        with self.store.lock(MODELS_DIR, key):
            entry = self.store.load_tensors(MODELS_DIR, key, text)
            hit = entry is not None and _load_state(model, entry[0], self.store.path(MODELS_DIR, key))
            if not hit:
                start = time.perf_counter()
                train(model, data(), self.profile.backdoor_optim(), seed=seed, desc=desc, progress=self.progress)
                self.store.save_tensors(MODELS_DIR, key, text, model.state_dict(),
                                        {"train_s": f"{time.perf_counter() - start:.1f}", "arch": arch})
        model.eval()
        self._models[key] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, hit

    def clean_model(self, cell: Cell):
        """A model trained on the clean training set: what Trojan and CL craft against, and the
        reference ACC of the benchmark. Returns (model, metrics {"acc"}, cache hit)."""
        spec, train_set, test_set = self.data(cell.dataset)
        model, hit = self._trained(cell.dataset, cell.student, cell.seed, None, lambda: train_set,
                                   f"clean {cell.student}")
        key = ("clean", cell.dataset, cell.student, cell.seed)
        if key not in self._metrics:
            self._metrics[key] = {"acc": accuracy(model, test_set)}
        return model, self._metrics[key], hit

    def supplied(self, cell: Cell, arch: str):
        """The supplier's model of ``arch`` for this cell: backdoored on the cell's poisoning (the
        student's own backdoored model when ``arch`` is the student). Returns (model, cache hit)."""
        p = self.poisoning(cell)
        return self._trained(cell.dataset, arch, cell.seed, p.key, lambda: p.poisoned,
                             f"backdoor {cell.attack}/{arch}")

    def backdoored(self, cell: Cell):
        """The backdoored model of (dataset, attack config, student, seed, profile), trained once;
        returns (model, metrics {"acc", "asr"}, cache hit)."""
        spec, train_set, test_set = self.data(cell.dataset)
        p = self.poisoning(cell)
        model, hit = self.supplied(cell, cell.student)
        key = ("backdoored", p.key, cell.student)
        if key not in self._metrics:
            self._metrics[key] = evaluate(model, test_set, p.triggered, p.attack.config.target)
        return model, self._metrics[key], hit

    def forget(self, cells: list[Cell]) -> int:
        """Remove the stored stages these cells use (``--rerun all``), so each is recomputed once.
        Returns the number of keys removed."""
        keys = set()
        for cell in cells:
            poison = self.poison_key(cell)[0]
            keys.add((POISON_DIR, poison))
            keys.add((MODELS_DIR, self.train_key(cell.dataset, cell.student, cell.seed, poison)[0]))
            if self.teacher_key(cell):
                keys.add((MODELS_DIR, self.teacher_key(cell)))
            if self.clean_reference or self.registry.attack(cell.attack).uses_clean_model:
                keys.add((MODELS_DIR, self.train_key(cell.dataset, cell.student, cell.seed, None)[0]))
        for stage, key in keys:
            self.store.forget(stage, key)
        self._poison.clear()
        self._models.clear()
        self._metrics.clear()
        return len(keys)

    # -- one cell -----------------------------------------------------------------------------
    def run_cell(self, cell: Cell, parent: str | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Run one cell and log it as a child run of ``parent`` (or into the open run ``run_id``)."""
        from .report import attention_figure, samples_figure

        t = self.tracker
        defense = self._defense_obj(cell.defense)
        params = {"dataset": cell.dataset, "attack.name": cell.attack, "defense.name": cell.defense,
                  "model.student": cell.student, "model.teacher": cell.teacher,
                  "teacher.source": cell.teacher_source or "none", "seed": cell.seed,
                  "defense.clean_share": self.clean_share(cell),
                  "device": str(self.device), **provenance(self.registry, cell),
                  **cfgmod.flatten(defense.config, "defense"), **cfgmod.flatten(self.profile, "profile")}
        # The run starts before any stage, data loading included (the cell's key holds the data's
        # digest), so every failure has a run.
        if t:
            if run_id is None:
                run_id = t.start(cell.label, params, parent=parent)
            else:
                t.params(run_id, params)
        log = (lambda key, value, step=None: t.metrics(run_id, {key: value}, step)) if t else \
            (lambda *a, **k: None)
        try:
            key = self.cell_key(cell)[0]
            if t:
                t.tag(run_id, "nadbench.cell_key", key)
            start = time.perf_counter()
            spec, train_set, test_set = self.data(cell.dataset)
            p = self.poisoning(cell)
            attack, target = p.attack, p.attack.config.target
            model, before, hit = self.backdoored(cell)
            teacher_hit = self.supplied(cell, cell.teacher)[1] if self.teacher_key(cell) else None
            t_backdoor = time.perf_counter() - start
            clean_ref = self.clean_model(cell)[1] if self.clean_reference else None
            if t:
                t.params(run_id, {**cfgmod.flatten(attack.config, "attack"), "attack.n_poisoned": len(p.index),
                                  "poison.cache_hit": p.hit, "backdoor.cache_hit": hit,
                                  "teacher.cache_hit": teacher_hit, "data.n_train": len(train_set),
                                  "data.n_test": len(test_set)})
                t.metrics(run_id, {"before.acc": before["acc"], "before.asr": before["asr"],
                                   "time.backdoor_s": t_backdoor,
                                   **({"clean.acc": clean_ref["acc"]} if clean_ref else {})})
                for path, image in p.images.items():
                    t.image(run_id, image, f"attack/{path}")
            # Nested over shares: the 1% subset of a seed lies inside its 5% one (subsets.clean_subset).
            clean = clean_subset(train_set, self.clean_share(cell), cell.seed)
            original = copy.deepcopy(model)
            ctx = self.defense_context(cell, log, run_id)
            repaired, t_defense = apply_defense(defense, model, clean, ctx)
            defended = repaired.model
            measured = measure_defended(repaired, lambda m: evaluate(m, test_set, p.triggered, target))
            after = measured["after"]
            result = {"cell": dataclasses.asdict(cell), "cell_key": key, "before": before, **measured,
                      "time_backdoor_s": t_backdoor, "time_defense_s": t_defense, "backdoor_cache_hit": hit,
                      "n_clean": len(clean), "clean_model": clean_ref, "status": "FINISHED"}
            if t:
                t.metrics(run_id, {"after.acc": after["acc"], "after.asr": after["asr"],
                                   "time.defense_s": t_defense, **side_metrics(result.get("models"))})
                if repaired.extras:
                    log_extras(t, run_id, result["extras"], cell.label)
                fig = attention_figure(original, defended, ctx.student_layers,
                                       [("clean", _clean_of(test_set, target)), ("triggered", p.triggered.images[:1])],
                                       title=f"{cell.label}: attention mean_c|F|^2")
                t.figure(run_id, fig, "attention/attention_maps.png")
                pick = _spread(p.index, 6).to(train_set.images.device)  # across classes: data is sorted by class
                keep = _spread((test_set.labels != target).nonzero().flatten(), 6)
                asr = _spread(torch.arange(len(p.triggered), device=keep.device), 6)  # the same images, triggered
                fig = samples_figure([
                    ("train, clean", train_set.images[pick], train_set.labels[pick]),
                    ("train, poisoned", p.poisoned.images[pick], p.poisoned.labels[pick]),
                    ("test, clean", test_set.images[keep], test_set.labels[keep]),
                    ("test, triggered", p.triggered.images[asr], p.triggered.labels[asr])],
                    title=f"{cell.attack}: clean vs poisoned (label shown)")
                t.figure(run_id, fig, "samples/clean_vs_poisoned.png")
                t.weights(run_id, original, "model/backdoored.safetensors")
                t.weights(run_id, defended, "model/defended.safetensors")
                t.tag(run_id, "nadbench.result", json.dumps(result))
                t.end(run_id)
            return result
        except BaseException as exc:  # recorded on the cell's run; the grid goes on (see run_grid)
            if t:
                t.text(run_id, traceback.format_exc(), "error.txt")
                t.tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
                t.end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def defense_context(self, cell: Cell, log, run_id: str | None = None) -> DefenseContext:
        """What the cell's defense may reach: architectures, a model builder, the supplied models,
        attention and classifier layers, device, seed, logging. Nothing that loads data: its
        callables hold the registry, the dataset's spec and the supplied models' weights, never
        this Runner (whose memory holds the test split and the ASR set)."""
        registry, device = self.registry, self.device
        spec = registry.dataset(cell.dataset)
        uses_teacher = registry.defense(cell.defense).uses_teacher
        # The supplier's models, as state dicts (the teacher is trained now if it is not stored).
        archs = [cell.teacher] if uses_teacher and cell.teacher_source == "supplied" else []
        archs += [cell.student] if not (uses_teacher and cell.teacher == cell.student) else []
        weights = {arch: self.supplied(cell, arch)[0].state_dict() for arch in archs}

        def build_model(arch: str):
            return build(registry.model(arch), spec, device)

        def supplied_model(arch: str):  # a fresh copy each call
            if arch not in weights:
                return None
            model = build_model(arch)
            model.load_state_dict(weights[arch])
            return model.eval()

        return DefenseContext(
            device=device, num_classes=spec.num_classes, student=cell.student, teacher=cell.teacher,
            seed=cell.seed, student_layers=attention_layers(registry, cell.student, cell.dataset),
            teacher_layers=attention_layers(registry, cell.teacher, cell.dataset),
            classifier_layer=classifier_layer(registry, cell.student, cell.dataset),
            build_model=build_model, supplied_model=supplied_model, log_metric=log,
            log_figure=figure_logger(self.tracker, run_id), progress=self.progress)


def _load_state(model: torch.nn.Module, state: dict, path: Path) -> bool:
    """Load a stored state dict; one that does not fit the model is reported and not used."""
    try:
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
        return True
    except RuntimeError as exc:
        warnings.warn(f"ignoring cache entry {path}: {str(exc).splitlines()[0]}; recomputing it", stacklevel=3)
        return False


def side_metrics(models: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """``{"teacher": {"acc": a, "asr": b}}`` -> ``{"teacher.acc": a, "teacher.asr": b}``."""
    return {f"{name}.{k}": v for name, values in (models or {}).items() for k, v in values.items()}


def log_table(tracker, run_id: str, results: list[dict], title: str) -> None:
    """Table 1 of a grid on its parent run: Markdown (also the run's description, which the MLflow
    UI's Overview page renders), JSON and a bar chart of ASR and ACC with error bars."""
    from . import table

    t = table.build(results)
    markdown = table.render(t, "markdown")
    tracker.tag(run_id, "mlflow.note.content", f"## {title}\n\n{markdown}")
    tracker.text(run_id, markdown, "table/table1.md")
    tracker.text(run_id, table.render(t, "json"), "table/table1.json")
    tracker.figure(run_id, table.figure(t, title), "table/table1.png")


def figure_logger(tracker, run_id: str | None):
    """``ctx.log_figure``: a defense's figure as the artifact ``defense/<path>`` of its run."""
    def log_figure(figure, path: str) -> None:
        if tracker and run_id:
            tracker.figure(run_id, figure, f"defense/{path}")
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)
    return log_figure


def log_extras(tracker, run_id: str, extras: dict, title: str) -> None:
    """The engine's evaluation of a defense's extra models: metrics ``<axis>.acc``/``<axis>.asr``
    (step = point index), the points as JSON and a plot of ACC and ASR over the axis."""
    from .report import line_figure

    axis, points = extras["axis"], extras["points"]
    for i, point in enumerate(points):
        tracker.metrics(run_id, {f"{axis}.{k}": v for k, v in point.items() if k != axis}, i)
    tracker.text(run_id, json.dumps(extras, indent=2), f"defense/{axis}_points.json")
    series = {k.upper(): [100 * p[k] for p in points] for k in ("acc", "asr") if all(k in p for p in points)}
    figure = line_figure([p[axis] for p in points], series, axis, "%", title=title)
    tracker.figure(run_id, figure, f"defense/{axis}_acc_asr.png")


def _spread(index: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` entries of ``index`` evenly spaced over its length."""
    return index[torch.linspace(0, len(index) - 1, min(n, len(index))).long().to(index.device)]


def _clean_of(test_set: Split, target: int) -> torch.Tensor:
    """The clean version of the first ASR image (first test image not of the target class)."""
    first = int((test_set.labels != target).nonzero()[0])
    return test_set.images[first:first + 1]


def run_grid(runner: Runner, cells: list[Cell], name: str = "grid", params: dict[str, Any] | None = None,
             results: list[dict] | None = None, failures: list[tuple[Cell, str]] | None = None,
             executor=None) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Run every cell under one parent run. A failing cell is recorded and the grid goes on.

    A cell whose result is already recorded as FINISHED under the same cell key is not recomputed
    (unless ``runner.rerun``): the parent gets a child run linked to the original. The others run in
    this process, or on ``executor`` (worker processes or Ray, see ``core/executors.py``).

    ``results`` and ``failures`` fill as cells end, so a caller interrupted by Ctrl-C or SIGTERM
    (a ``KeyboardInterrupt``: the current cell's run and the parent end KILLED) keeps what finished.
    """
    t = runner.tracker
    results = [] if results is None else results
    failures = [] if failures is None else failures
    parent = t.start(name, params, tags={"nadbench.grid": "1"}) if t else None
    status = "KILLED"  # unless the loop completes
    bar = tqdm(total=len(cells), desc="grid", unit="cell", disable=not runner.progress, dynamic_ncols=True)
    try:
        todo = []
        for cell in cells:
            try:
                prior = t.finished_cell(runner.cell_key(cell)[0]) if t and not runner.rerun else None
            except Exception:  # noqa: BLE001 — e.g. data that cannot be loaded: the cell runs and records why
                prior = None
            if prior is None:
                todo.append(cell)
                continue
            # The cell as this grid names it: a key also matches a cell of a grid that left an axis
            # at its default (clean share None: the profile's 0.05 is the same subset as 0.05).
            results.append({**t.reuse(prior, cell.label, parent), "cell": dataclasses.asdict(cell)})
            bar.update()
        if runner.rerun == "all":
            runner.forget(todo)
        if len(todo) < len(cells):
            tqdm.write(f"resuming: {len(cells) - len(todo)} cell(s) already recorded, {len(todo)} to run",
                       file=sys.stderr)

        def done(cell: Cell, result: dict | None, error: str | None) -> None:
            if error is None:
                results.append(result)
            else:
                failures.append((cell, error))
                tqdm.write(f"cell {cell.label} failed: {error}", file=sys.stderr)
            bar.update()

        if executor is None:
            for cell in todo:
                bar.set_postfix_str(cell.label)
                try:
                    done(cell, runner.run_cell(cell, parent), None)
                except Exception as exc:
                    done(cell, None, f"{type(exc).__name__}: {exc}")
        else:
            executor.run(runner, todo, parent, done)
        status = "FAILED" if failures else "FINISHED"
    finally:
        bar.close()
        order = {cell: i for i, cell in enumerate(cells)}
        results.sort(key=lambda r: order.get(Cell(**r["cell"]), 0))
        if t:
            t.text(parent, json.dumps(results, indent=2), "results.json")
            try:
                if results:
                    log_table(t, parent, results, name)
            except Exception as exc:  # noqa: BLE001 — a table that cannot be drawn must not lose the grid's status
                warnings.warn(f"could not log the grid's table: {type(exc).__name__}: {exc}", stacklevel=2)
            t.end(parent, status)
    return results, failures
