"""The grid runner: expands datasets x attacks x defenses x student/teacher x seeds into cells and
runs each one the same way: poison, train (or reuse) the backdoored model, evaluate, defend,
evaluate again, log everything to MLflow.

The defense sees only the model and the clean subset; the engine alone evaluates ACC and ASR.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import config as cfgmod
from . import data as datamod
from .api import AttackContext, DefenseContext, Split
from .attention import layer_names
from .config import param
from .models import build, load_cached, save_weights
from .registry import PluginError, Registry
from .train import FinetuneParams, Optim, accuracy, evaluate, train

# Bump when a core change alters trained weights: every cached model is then retrained.
CACHE_VERSION = "2"
MODELS_DIR = "models"  # under the cache folder (``$NADBENCH_CACHE``, default ~/.cache/nadbench)


@dataclass(frozen=True)
class Profile:
    """How the backdoored models are trained and how much data a cell uses. Defenses keep their
    own (paper) settings in every profile; override them with ``--set nad.epochs=...``."""

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
    # Applies by field to every defense built on FinetuneParams (built-in or not); --set wins.
    finetune_lr: float | None = param(None, "initial lr of every defense built on FinetuneParams "
                                      "(none: each defense's own default)", min=0.0, max=10.0)

    def backdoor_optim(self) -> Optim:
        return Optim(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, momentum=0.9,
                     nesterov=True, weight_decay=self.weight_decay, schedule=self.schedule,
                     milestones=self.milestones, crop=self.crop, flip=self.flip)


PROFILES = {
    # For a GPU: 100 epochs of SGD at lr 0.1 (the official code's optimiser, batch 64, weight decay
    # 1e-4), dropping 10x at epochs 50 and 75; defenses at the paper's settings.
    "paper": Profile(name="paper"),
    # Fits BadNets x {finetune, NAD} on CIFAR-10 into ~12 minutes on a 2-core CPU. A 10-epoch
    # model is less settled than the paper's 100-epoch one: the paper's finetuning lr of 0.1 costs
    # it ~7 ACC points (vs ~4.5 in the paper), so this profile starts every finetuning-style
    # defense at 0.03 (measured: ASR 100 -> 2.5 with an ACC drop of 2.3; see benchmarks/results/).
    "quick": Profile(name="quick", epochs=10, lr=0.2, schedule="onecycle", milestones=(),
                     batch_size=128, weight_decay=5e-4, finetune_lr=0.03),
}


def defense_overrides(prof: Profile, defense: type, user: dict[str, str] | None) -> dict[str, str]:
    """The ``--set`` overrides of one defense, over the profile's field defaults. The profile's
    ``finetune_lr`` applies to every defense whose config is a ``FinetuneParams`` (by field, never
    by plugin name), so a third-party finetuning-style defense runs at the same lr as the built-ins."""
    merged = {}
    if prof.finetune_lr is not None and issubclass(defense.Config, FinetuneParams):
        merged["lr"] = str(prof.finetune_lr)
    merged.update(user or {})
    return merged


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


@dataclass(frozen=True)
class Cell:
    dataset: str
    attack: str
    defense: str
    student: str
    teacher: str
    seed: int

    @property
    def label(self) -> str:
        arch = self.student if self.teacher == self.student else f"{self.student}<-{self.teacher}"
        return f"{self.dataset}/{self.attack}/{self.defense}/{arch}/seed{self.seed}"


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


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def check_grid(registry: Registry, cells: list[Cell], overrides: dict[str, dict[str, str]]) -> None:
    """Everything that can be checked before anything trains: every plugin config (with the
    overrides the Runner will use), every model's attention layers, and every defense against its
    student/teacher pair (NAD: one beta per attention layer). Raises ``ConfigError`` or ``PluginError``."""
    layers: dict[tuple[str, str], tuple[str, ...]] = {}

    def layers_of(arch, dataset):
        if (arch, dataset) not in layers:
            layers[arch, dataset] = attention_layers(registry, arch, dataset)
        return layers[arch, dataset]

    for cell in cells:
        attack_cls = registry.attack(cell.attack)
        attack_cls.from_overrides(overrides.get(attack_cls.name))
        defense_cls = registry.defense(cell.defense)
        defense = defense_cls.from_overrides(overrides.get(defense_cls.name))
        defense.check(layers_of(cell.student, cell.dataset), layers_of(cell.teacher, cell.dataset))


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


def expand(registry: Registry, datasets, attacks, defenses, students, teachers, seeds) -> list[Cell]:
    """All cells of the grid. Teacher architectures multiply only defenses that use a teacher."""
    cells = []
    for d, a, de, s, seed in itertools.product(datasets, attacks, defenses, students, seeds):
        uses_teacher = getattr(registry.defense(de), "uses_teacher", False)
        for t in (teachers or [s]) if uses_teacher else [s]:
            cells.append(Cell(d, a, de, s, t, seed))
    return cells


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("--device cuda asked for, but torch sees no CUDA device; valid: auto, cpu")
    return device


def _seeded(seed: int, salt: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class Runner:
    def __init__(self, registry: Registry, prof: Profile, *, device: torch.device, data_root=None,
                 overrides: dict[str, dict[str, str]] | None = None, tracker=None, progress=True,
                 cache_dir: Path | None = None, clean_reference: bool = False):
        self.registry, self.profile, self.device = registry, prof, device
        self.data_root, self.tracker, self.progress = data_root, tracker, progress
        self.overrides = overrides or {}
        self.clean_reference = clean_reference
        self.cache_dir = Path(cache_dir or datamod.cache_dir()) / MODELS_DIR
        self._data: dict[str, tuple] = {}
        self._attacks: dict[tuple, Any] = {}
        self._models: dict[str, dict] = {}       # cache key -> state dict
        self._metrics: dict[tuple, dict] = {}

    # -- building blocks, each cached ---------------------------------------------------------
    def data(self, name: str):
        if name not in self._data:
            spec = self.registry.dataset(name)
            train_set, test_set = spec.load(self.data_root)
            train_set = datamod.limit(train_set, self.profile.train_limit, seed=0)
            test_set = datamod.limit(test_set, self.profile.test_limit, seed=0)
            self._data[name] = (spec, train_set.to(self.device), test_set.to(self.device))
        return self._data[name]

    def attack(self, cell: Cell):
        """The prepared attack of (attack, dataset, student, seed): (attack, poisoned train set,
        poisoned indices, ASR set, images the attack logged)."""
        key = (cell.attack, cell.dataset, cell.student, cell.seed)
        if key not in self._attacks:
            spec, train_set, test_set = self.data(cell.dataset)
            attack_cls = self.registry.attack(cell.attack)
            attack = attack_cls.from_overrides(self.overrides.get(attack_cls.name))
            images: dict[str, Any] = {}
            attack.prepare(AttackContext(
                dataset=spec, train=train_set, device=self.device, seed=cell.seed,
                clean_model=lambda: self.clean_model(cell)[0],
                load_dataset=lambda name: self.registry.dataset(name).load(self.data_root),
                log_image=images.__setitem__, progress=self.progress))
            poisoned, index = attack.poison_train(train_set, _seeded(cell.seed, "poison"))
            triggered = attack.trigger_test(test_set)
            self._attacks[key] = (attack, poisoned, index, triggered, images)
        return self._attacks[key]

    def _trained(self, what: dict[str, Any], arch: str, dataset: str, seed: int, data: Split, desc: str):
        """A model of ``arch`` trained on ``data`` with the profile's schedule, cached in memory and
        on disk under a content hash of ``what`` (+ architecture, seed, profile); returns (model, hit)."""
        spec, train_set, test_set = self.data(dataset)
        prof = dataclasses.asdict(self.profile)
        for k in ("name", "clean_share", "finetune_lr"):  # no effect on the trained model
            prof.pop(k)
        model_spec = self.registry.model(arch)
        # Everything that changes the weights, the plugins' code included (provider + source hash).
        key_src = json.dumps({"v": CACHE_VERSION, "dataset": dataset, "n_train": len(train_set),
                              "dataset_plugin": [spec.provider, spec.source_hash],
                              "n_test": len(test_set), "model": arch,
                              "model_plugin": [model_spec.provider, model_spec.source_hash],
                              "device": self.device.type, "seed": seed, "profile": prof, **what},
                             sort_keys=True, default=str)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        torch.manual_seed(seed)
        model = build(model_spec, spec, self.device)
        if key in self._models:
            model.load_state_dict(self._models[key])
            return model, True
        path = self.cache_dir / f"{key}.safetensors"
        hit = load_cached(model, path, key_src)
        if not hit:
            start = time.perf_counter()
            train(model, data, self.profile.backdoor_optim(), seed=seed, desc=desc, progress=self.progress)
            save_weights(model, path, {"key": key_src, "train_s": f"{time.perf_counter() - start:.1f}"})
        model.eval()
        self._models[key] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, hit

    def clean_model(self, cell: Cell):
        """A model trained on the clean training set: what Trojan and CL craft against, and the
        reference ACC of the benchmark. Returns (model, metrics {"acc"}, cache hit)."""
        spec, train_set, test_set = self.data(cell.dataset)
        model, hit = self._trained({"attack": None}, cell.student, cell.dataset, cell.seed, train_set,
                                   f"clean {cell.student}")
        key = ("clean", cell.dataset, cell.student, cell.seed)
        if key not in self._metrics:
            self._metrics[key] = {"acc": accuracy(model, test_set)}
        return model, self._metrics[key], hit

    def backdoored(self, cell: Cell):
        """The backdoored model of (dataset, attack config, student, seed, profile), trained once;
        returns (model, metrics {"acc", "asr"}, cache hit)."""
        spec, train_set, test_set = self.data(cell.dataset)
        attack, poisoned, _, triggered, _ = self.attack(cell)
        what = {"attack": attack.name, "attack_config": dataclasses.asdict(attack.config),
                "attack_plugin": [attack.provider, attack.source_hash]}
        model, hit = self._trained(what, cell.student, cell.dataset, cell.seed, poisoned,
                                   f"backdoor {cell.attack}/{cell.student}")
        key = ("backdoored", cell.dataset, cell.attack, cell.student, cell.seed)
        if key not in self._metrics:
            self._metrics[key] = evaluate(model, test_set, triggered, attack.config.target)
        return model, self._metrics[key], hit

    # -- one cell -----------------------------------------------------------------------------
    def run_cell(self, cell: Cell, parent: str | None = None) -> dict[str, Any]:
        from .report import attention_figure, samples_figure

        t = self.tracker
        defense_cls = self.registry.defense(cell.defense)
        defense = defense_cls.from_overrides(self.overrides.get(defense_cls.name))
        params = {"dataset": cell.dataset, "attack.name": cell.attack, "defense.name": cell.defense,
                  "model.student": cell.student, "model.teacher": cell.teacher, "seed": cell.seed,
                  "device": str(self.device), **provenance(self.registry, cell),
                  **cfgmod.flatten(defense.config, "defense"), **cfgmod.flatten(self.profile, "profile")}
        # The run starts before any stage, data loading included, so every failure has a run.
        run_id = t.start(cell.label, params, parent=parent) if t else None
        log = (lambda key, value, step=None: t.metrics(run_id, {key: value}, step)) if t else \
            (lambda *a, **k: None)
        try:
            start = time.perf_counter()
            spec, train_set, test_set = self.data(cell.dataset)
            attack, poisoned, index, triggered, attack_images = self.attack(cell)
            model, before, hit = self.backdoored(cell)
            t_backdoor = time.perf_counter() - start
            clean_ref = self.clean_model(cell)[1] if self.clean_reference else None
            if t:
                t.params(run_id, {**cfgmod.flatten(attack.config, "attack"), "attack.n_poisoned": len(index),
                                  "backdoor.cache_hit": hit, "data.n_train": len(train_set),
                                  "data.n_test": len(test_set)})
                t.metrics(run_id, {"before.acc": before["acc"], "before.asr": before["asr"],
                                   "time.backdoor_s": t_backdoor,
                                   **({"clean.acc": clean_ref["acc"]} if clean_ref else {})})
                for path, image in attack_images.items():
                    t.image(run_id, image, f"attack/{path}")
            clean = datamod.clean_subset(train_set, self.profile.clean_share, cell.seed)
            original = copy.deepcopy(model)
            ctx = DefenseContext(device=self.device, dataset=spec, student=self.registry.model(cell.student),
                                 teacher=self.registry.model(cell.teacher), seed=cell.seed,
                                 log_metric=log, progress=self.progress,
                                 supplied_model=lambda arch: copy.deepcopy(original) if arch == cell.student else None)
            defended, t_defense = apply_defense(defense, model, clean, ctx)
            after = evaluate(defended, test_set, triggered, attack.config.target)
            result = {"cell": dataclasses.asdict(cell), "before": before, "after": after,
                      "time_backdoor_s": t_backdoor, "time_defense_s": t_defense, "backdoor_cache_hit": hit,
                      "n_clean": len(clean), "clean_model": clean_ref, "status": "FINISHED"}
            if t:
                t.metrics(run_id, {"after.acc": after["acc"], "after.asr": after["asr"],
                                   "time.defense_s": t_defense})
                layers = layer_names(defended, ctx.student.attention_layers)
                fig = attention_figure(original, defended, layers,
                                       [("clean", _clean_of(test_set, attack)), ("triggered", triggered.images[:1])],
                                       title=f"{cell.label}: attention mean_c|F|^2")
                t.figure(run_id, fig, "attention/attention_maps.png")
                pick = _spread(index, 6).to(train_set.images.device)  # across classes: data is sorted by class
                keep = _spread((test_set.labels != attack.config.target).nonzero().flatten(), 6)
                fig = samples_figure([
                    ("train, clean", train_set.images[pick], train_set.labels[pick]),
                    ("train, poisoned", poisoned.images[pick], poisoned.labels[pick]),
                    ("test, clean", test_set.images[keep], test_set.labels[keep]),
                    ("test, triggered", attack.apply_trigger(test_set.images[keep]), test_set.labels[keep])],
                    title=f"{cell.attack}: clean vs poisoned (label shown)")
                t.figure(run_id, fig, "samples/clean_vs_poisoned.png")
                t.weights(run_id, original, "model/backdoored.safetensors")
                t.weights(run_id, defended, "model/defended.safetensors")
                t.end(run_id)
            return result
        except BaseException as exc:  # recorded on the cell's run; the grid goes on (see run_grid)
            if t:
                t.text(run_id, traceback.format_exc(), "error.txt")
                t.tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
                t.end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise


def apply_defense(defense, model: torch.nn.Module, clean: Split, ctx: DefenseContext) -> tuple[torch.nn.Module, float]:
    """The one way a defense runs, in a grid cell and in `bench defend`: seeded, timed, and held to
    the contract (it returns the repaired module). Returns (repaired model, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    defended = defense.defend(model, clean, ctx)
    if not isinstance(defended, torch.nn.Module):
        raise PluginError(f"defense {defense.name!r} ({defense.provider}) breaks the plugin contract: "
                          f"defend() must return the repaired nn.Module, it returned {defended!r}")
    return defended, time.perf_counter() - start


def _spread(index: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` entries of ``index`` evenly spaced over its length."""
    return index[torch.linspace(0, len(index) - 1, min(n, len(index))).long().to(index.device)]


def _clean_of(test_set: Split, attack) -> torch.Tensor:
    """The clean version of the first ASR image (first test image not of the target class)."""
    first = int((test_set.labels != attack.config.target).nonzero()[0])
    return test_set.images[first:first + 1]


def run_grid(runner: Runner, cells: list[Cell], name: str = "grid", params: dict[str, Any] | None = None,
             results: list[dict] | None = None,
             failures: list[tuple[Cell, str]] | None = None) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Run every cell under one parent run. A failing cell is recorded and the grid goes on.

    ``results`` and ``failures`` fill as cells end, so a caller interrupted by Ctrl-C or SIGTERM
    (a ``KeyboardInterrupt``: the current cell's run and the parent end KILLED) keeps what finished.
    """
    t = runner.tracker
    results = [] if results is None else results
    failures = [] if failures is None else failures
    parent = t.start(name, params) if t else None
    status = "KILLED"  # unless the loop completes
    bar = tqdm(cells, desc="grid", unit="cell", disable=not runner.progress, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.label)
            try:
                results.append(runner.run_cell(cell, parent))
            except Exception as exc:
                failures.append((cell, f"{type(exc).__name__}: {exc}"))
                tqdm.write(f"cell {cell.label} failed: {type(exc).__name__}: {exc}")
        status = "FAILED" if failures else "FINISHED"
    finally:
        if t:
            t.text(parent, json.dumps(results, indent=2), "results.json")
            t.end(parent, status)
    return results, failures
