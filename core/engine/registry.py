"""Plugin discovery: every plugin, built-in or third-party, comes through the `nadbench`
entry-point group and registers its items through `register_*(register)` hooks.

Unlike pluggy's `load_setuptools_entrypoints`, entry points are loaded one by one: a plugin that
fails to import or to register is recorded (name, distribution, traceback) and skipped, and the
rest of the registry keeps working. Built-ins load first and keep their names.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import itertools
import os
import re
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from ..contract import hookspecs
from ..contract.api import (DETECTOR_LEVELS, TARGET_MODES, Attack, DatasetSpec, Defense, Detector, ModelSpec,
                            TrainingDefense)
from ..contract.config import ConfigError, PluginError, check_fields  # noqa: F401 — PluginError is re-exported

GROUP = "nadbench"
BUILTIN = "nadbench"  # the distribution whose items keep their names against any third party
DISABLE_ENV = "NADBENCH_DISABLE_PLUGINS"
KINDS = ("datasets", "models", "attacks", "defenses", "detectors")
_TYPES = {"datasets": DatasetSpec, "models": ModelSpec, "attacks": Attack, "defenses": Defense,
          "detectors": Detector}
# The kinds registered as classes with a typed Config (the others as spec instances).
METHODS = ("attacks", "defenses", "detectors")
# Built-in names that were given up, and why: asking for one says where it went.
RENAMED = {("attacks", "ssba"): "stegastamp: SSBA's trigger generator, whose trigger here is not sample-specific "
                                "(benchmarks/results/ssba-specificity-quick.md)"}


@dataclass
class PluginInfo:
    name: str             # entry-point name
    value: str            # module path
    distribution: str     # "nadbench 0.1.0", or "" when not installed as a distribution
    hooks: list[str] = field(default_factory=list)
    error: str | None = None       # one line
    traceback: str | None = None   # the whole story, for `bench plugins --verbose`
    refused: list[str] = field(default_factory=list)  # items refused (a built-in's name), one line each
    disabled: bool = False         # blocked by NADBENCH_DISABLE_PLUGINS

    @property
    def dist_name(self) -> str:
        """The distribution's name (the qualifier of ``dist:name``), or the entry-point name."""
        return self.distribution.split(" ")[0] if self.distribution else self.name

    @property
    def builtin(self) -> bool:
        return self.dist_name == BUILTIN


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def _source_hash(*modules: str) -> str:
    """The hash of a plugin's code: its modules and what they import within its own package and
    nadbench (``codehash.code_hash``): editing a plugin, or a core module it uses, changes it (and
    so the cache keys of everything it produced)."""
    from .codehash import code_hash

    return code_hash(*sorted({m for m in modules if m}))


def _defining_module(kind: str, item: Any) -> str:
    if kind in METHODS:
        return item.__module__
    fn = item.build if kind == "models" else item.load
    return getattr(getattr(fn, "func", fn), "__module__", "") or ""


def _overrides(cls: type, base: type, method: str) -> bool:
    return getattr(cls, method) is not getattr(base, method)


def check_contract(kind: str, item: Any) -> None:
    """What the plugin contract demands of an item and can be checked without running anything.
    Raises ``PluginError`` naming the rule that is broken."""
    expected = _TYPES[kind]
    if kind in METHODS:
        if not (isinstance(item, type) and issubclass(item, expected)):
            raise PluginError(f"register_{kind} got {item!r}; expected a subclass of nadbench.{expected.__name__}")
    elif not isinstance(item, expected):
        raise PluginError(f"register_{kind} got {item!r}; expected an instance of nadbench.{expected.__name__}")
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name or any(c in name for c in ",: ="):
        raise PluginError(f"{kind[:-1]} name {name!r} is invalid: a non-empty string without ',', ':', '=' "
                          "or spaces")
    if kind not in METHODS:
        return
    what = f"{kind[:-1]} {name!r}"
    try:
        check_fields(item.Config)
    except AttributeError:
        raise PluginError(f"{what} has no Config (a dataclass of its settings)") from None
    except ConfigError as exc:
        raise PluginError(f"{what}: {exc}") from None
    fields = {f.name for f in dataclasses.fields(item.Config)}
    _check_profile_settings(what, item, fields)
    for flag in ("uses_clean_model", "uses_teacher", "uses_clean_data", "uses_model", "trains"):
        if not isinstance(getattr(item, flag, True), bool):
            raise PluginError(f"{what}: {flag} must be True or False, not {getattr(item, flag)!r}")
    _check_variants(what, item, fields)
    if kind == "attacks":
        if not (isinstance(item.all_datasets, tuple) and all(isinstance(d, str) for d in item.all_datasets)):
            raise PluginError(f"{what}: all_datasets must be a tuple of dataset names, not {item.all_datasets!r}")
        if "target" not in fields:
            raise PluginError(f"{what}: its Config has no 'target' field (the target label every attack declares)")
        if not _overrides(item, Attack, "apply_trigger"):
            raise PluginError(f"{what} does not implement apply_trigger(images)")
        if "poison_rate" not in fields and not _overrides(item, Attack, "poison_train"):
            raise PluginError(f"{what}: its Config has no 'poison_rate' field and it does not override "
                              "poison_train()")
        learnt = [m for m in ("learned_state", "load_learned_state") if _overrides(item, Attack, m)]
        if learnt and item.learns_trigger is not True:
            raise PluginError(f"{what} overrides {' and '.join(m + '()' for m in learnt)} but does not set "
                              "learns_trigger = True, without which the engine neither stores nor restores what "
                              "it learnt: set learns_trigger = True on the class")
    elif kind == "defenses" and item.trains:
        if not (issubclass(item, TrainingDefense) and _overrides(item, TrainingDefense, "train")):
            raise PluginError(f"{what} trains (trains = True) and does not implement train(data, clean, ctx): "
                              "subclass nadbench.TrainingDefense and implement it")
        if item.uses_teacher:
            raise PluginError(f"{what} trains (trains = True), and a training-time defense has no supplied teacher: "
                              "it cannot set uses_teacher = True")
    elif kind == "defenses" and not _overrides(item, Defense, "defend"):
        raise PluginError(f"{what} does not implement defend(model, clean, ctx)")
    elif kind == "detectors":
        _check_detector(what, item)


def _check_detector(what: str, item: Any) -> None:
    if item.level not in DETECTOR_LEVELS:
        raise PluginError(f"{what}: level must be one of {', '.join(DETECTOR_LEVELS)}, not {item.level!r}")
    needed = {"data": ["detect"], "input": ["score"]}[item.level]
    missing = [m for m in needed if not _overrides(item, Detector, m)]
    if missing:
        raise PluginError(f"{what} is {'a data' if item.level == 'data' else 'an input'}-level detector and does not implement "
                          f"{', '.join(m + '()' for m in missing)}")


# A variant's name: lowercase letters, digits, '_' or '-' (it follows '@' in a cell's attack or
# defense, and '.' would split a --set).
_VARIANT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _has_target_mode(item: Any) -> bool:
    return "target_mode" in {f.name for f in dataclasses.fields(item.Config)}


def variant_order(variant: str) -> tuple[bool, str]:
    """The canonical order of a spelling's variants: by name, the target variant (all2all) last."""
    return (variant in TARGET_MODES, variant)


def variants_of(item: Any) -> tuple[str, ...]:
    """The variants an attack or defense accepts after ``@``, in canonical order: those it declares
    in ``variant_defaults``, and ``all2all`` where its Config has a ``target_mode`` field."""
    names = set(getattr(item, "variant_defaults", {}) or {})
    if _has_target_mode(item):
        names.add("all2all")
    return tuple(sorted(names, key=variant_order))


def spelling(base: str, variants) -> str:
    """The canonical spelling of ``base`` with ``variants``: each once, by name, the target variant
    last; ``all2one`` (the plain name's mode) left out. ``sig``, ``bppattack@bb@all2all``."""
    return base + "".join(f"@{v}" for v in sorted(set(variants) - {"all2one"}, key=variant_order))


def addressing(base: str, variants) -> list[str]:
    """The spellings whose ``--set`` reaches the cell ``base@variants``, least specific first after
    the plain name's: each variant alone, then each larger combination, the cell's own last."""
    vs = sorted(set(variants) - {"all2one"}, key=variant_order)
    combos = [c for n in range(1, len(vs) + 1) for c in itertools.combinations(vs, n)]
    return [spelling(base, c) for c in combos]


def _check_variants(what: str, item: Any, fields: set[str]) -> None:
    variants = getattr(item, "variant_defaults", {})
    if not isinstance(variants, dict) or any(
            not isinstance(v, str) or not _VARIANT.match(v) or v == "all2one" or not isinstance(vals, dict)
            or set(vals) - fields or "target_mode" in vals or (v == "all2all" and "target_mode" not in fields)
            for v, vals in variants.items()):
        raise PluginError(f"{what}: variant_defaults must map a variant (all2all, for a Config with target_mode; "
                          "or a name of lowercase letters, digits, '_' or '-', e.g. bb) to a dict of its Config "
                          f"fields other than target_mode, not {variants!r}")
    _check_profile_keys(what, "variant_defaults", [v for vals in variants.values() for v in vals.values()])


def _check_profile_settings(what: str, item: Any, fields: set[str]) -> None:
    from .grid import Profile

    settings = getattr(item, "profile_settings", {})
    profile_fields = {f.name for f in dataclasses.fields(Profile)}
    if not isinstance(settings, dict):
        raise PluginError(f"{what}: profile_settings must be a dict (config field -> profile field or "
                          f"{{profile: value}}), not {settings!r}")
    for field, source in settings.items():
        if field not in fields:
            raise PluginError(f"{what}: profile_settings names {field!r}, which is not a field of its Config "
                              f"(fields: {', '.join(sorted(fields))})")
        if isinstance(source, str) and source not in profile_fields:
            raise PluginError(f"{what}: profile_settings[{field!r}] = {source!r} is not a profile field "
                              f"(valid: {', '.join(sorted(profile_fields))})")
        if not isinstance(source, (str, dict)):
            raise PluginError(f"{what}: profile_settings[{field!r}] must be a profile field name or "
                              f"{{profile name: value}}, not {source!r}")
    _check_profile_keys(what, "profile_settings", list(settings.values()))


def _check_profile_keys(what: str, attr: str, values: list) -> None:
    """A ``{profile name: value}`` entry must name profiles that exist (a typo would be ignored)."""
    from .grid import PROFILES

    for value in values:
        if isinstance(value, dict) and set(value) - set(PROFILES):
            raise PluginError(f"{what}: {attr} entry {value!r} names no profile in {sorted(set(value) - set(PROFILES))} "
                              f"(profiles: {', '.join(PROFILES)})")


class Registry:
    """The registered datasets, models, attacks, defenses and detectors, each tagged with its provider.

    Names: a built-in (distribution ``nadbench``) keeps its name; a third-party item claiming it is
    refused and reported. Two third-party items with one name make the plain name ambiguous; each
    stays reachable as ``dist:name`` (every item is), or the user blocks one plugin with
    ``NADBENCH_DISABLE_PLUGINS=<entry point or distribution>``.
    """

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}       # plain name -> item
        self.qualified: dict[str, dict[str, Any]] = {k: {} for k in KINDS}   # dist:name -> item
        self.ambiguous: dict[str, dict[str, list[str]]] = {k: {} for k in KINDS}  # name -> providers
        self.plugins: list[PluginInfo] = []
        self.disabled: set[str] = set()  # what load_entrypoints left out (worker processes load the same)
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)

    # -- lookup -------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """The plain (unambiguous) names of ``kind``."""
        return sorted(self.items[kind])

    def get(self, kind: str, name: str) -> Any:
        if kind in METHODS and "@" in name:  # a variant: NAME@bb, NAME@all2all, NAME@bb@all2all
            return self._variant(kind, name)
        if name in self.items[kind]:
            return self.items[kind][name]
        if name in self.qualified[kind]:
            return self.qualified[kind][name]
        if name in self.ambiguous[kind]:
            raise PluginError(self.ambiguity(kind, name))
        valid = ", ".join(self.names(kind)) or "(none registered)"
        renamed = f"; {name!r} is now {RENAMED[kind, name]}" if (kind, name) in RENAMED else ""
        raise PluginError(f"unknown {kind[:-1]} {name!r}{renamed}; valid {kind}: {valid}{self.failure_hint()}")

    def _variant(self, kind: str, name: str) -> Any:
        """The attack or defense of ``NAME@v1@v2...`` (variants in any order), or an error naming the
        method's valid variants."""
        base, *variants = name.split("@")
        cls = self.get(kind, base)
        valid = variants_of(cls)
        modes = [v for v in variants if v in TARGET_MODES]
        if (not all(v in valid or (v == "all2one" and _has_target_mode(cls)) for v in variants)
                or len(set(variants)) < len(variants) or len(modes) > 1):
            able = ""
            if kind == "attacks" and any(v in TARGET_MODES and v not in valid for v in variants):
                able = [n for n in self.names("attacks") if _has_target_mode(self.get("attacks", n))]
                able = f" (@all2all: the attacks with a target_mode field: {', '.join(able) or '(none)'})"
            raise PluginError(f"unknown {kind[:-1]} variant {name!r}: valid variants of {base}: "
                              f"{', '.join('@' + v for v in valid) or '(none)'}, each at most once, "
                              f"in any order{able}")
        return cls

    def canonical(self, kind: str, name: str) -> str:
        """The canonical spelling of a (valid) name: a variant's, see :func:`spelling`; others as given."""
        if "@" not in name or kind not in METHODS:
            return name
        self.get(kind, name)
        base, *variants = name.split("@")
        return spelling(base, variants)

    def ambiguity(self, kind: str, name: str) -> str:
        options = [q for q, item in self.qualified[kind].items() if item.name == name]
        plugins = [p.name for p in self.plugins if any(q.split(":")[0] == p.dist_name for q in options)]
        return (f"{kind[:-1]} {name!r} is ambiguous: provided by {' and '.join(self.ambiguous[kind][name])}. "
                f"Choose one as {' or '.join(options)}, or block a plugin with "
                f"{DISABLE_ENV}={plugins[-1] if plugins else '<plugin>'}")

    def failure_hint(self) -> str:
        """A note about plugins that failed to load (one of them may provide the missing name)."""
        if not self.failed:
            return ""
        names = ", ".join(f"{p.name} ({p.error})" for p in self.failed)
        return f". Note: {len(self.failed)} plugin(s) failed to load: {names}; see `bench plugins -v`"

    def problems(self) -> list[str]:
        """One line per refused item and per ambiguous name, for warnings."""
        lines = [f"{p.dist_name}: {msg}" for p in self.plugins for msg in p.refused]
        lines += [self.ambiguity(k, n) for k in KINDS for n in sorted(self.ambiguous[k])]
        return lines

    def attack(self, name: str) -> type[Attack]:
        return self.get("attacks", name)

    def defense(self, name: str) -> type[Defense]:
        return self.get("defenses", name)

    def model(self, name: str) -> ModelSpec:
        return self.get("models", name)

    def dataset(self, name: str) -> DatasetSpec:
        return self.get("datasets", name)

    def detector(self, name: str) -> type[Detector]:
        return self.get("detectors", name)

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    # -- loading ------------------------------------------------------------------------------
    def add_plugin(self, module: Any, info: PluginInfo) -> None:
        """Register one plugin object (a module with hook implementations) and collect its items.

        Everything a plugin registers is checked here; on any error the plugin is unregistered
        again, none of its items are kept, and the error is recorded on ``info``.
        """
        self.plugins.append(info)
        try:
            self.pm.register(module, name=f"{info.name}:{info.value}")
        except Exception as exc:  # e.g. a hookimpl with a wrong signature
            info.error, info.traceback = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            return
        info.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(module) or [])
        try:
            self.pm.check_pending()  # a hook implementation with no matching spec (a typo) is an error
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(module)
            info.error = (f"PluginError: {exc}; valid hooks: "
                          f"{', '.join('register_' + k for k in KINDS)}")
            return
        pending: list[tuple[str, Any]] = []
        try:
            for kind in KINDS:
                hook = getattr(self.pm.hook, f"register_{kind}")
                impls = [i for i in hook.get_hookimpls() if i.plugin is module]
                for impl in impls:
                    impl.function(register=self._register_fn(kind, pending))
        except Exception as exc:
            self.pm.unregister(module)
            info.error, info.traceback = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            return
        for kind, item in pending:
            self._commit(kind, item, info, getattr(module, "__name__", ""))

    def _register_fn(self, kind: str, pending: list):
        def register(item: Any) -> None:
            check_contract(kind, item)
            if any(k == kind and other.name == item.name for k, other in pending):
                raise PluginError(f"{kind[:-1]} {item.name!r} registered twice by the same plugin")
            pending.append((kind, item))
        return register

    def _commit(self, kind: str, item: Any, info: PluginInfo, plugin_module: str) -> None:
        name, provider = item.name, info.distribution or info.name
        builtin_here = self.items[kind].get(name)
        if builtin_here is not None and builtin_here.provider.split(" ")[0] == BUILTIN and not info.builtin:
            info.refused.append(f"{kind[:-1]} {name!r} refused: the name belongs to a built-in "
                                f"({builtin_here.provider}); the built-in keeps it")
            return
        source = _source_hash(plugin_module, _defining_module(kind, item))
        if kind in METHODS:
            item.provider, item.source_hash = provider, source
        else:
            item = replace(item, provider=provider, source_hash=source)
        self.qualified[kind][f"{info.dist_name}:{name}"] = item
        if name in self.ambiguous[kind]:
            self.ambiguous[kind][name].append(provider)
        elif name in self.items[kind]:  # two third-party plugins: neither wins
            self.ambiguous[kind][name] = [self.items[kind].pop(name).provider, provider]
        else:
            self.items[kind][name] = item

    def load_entrypoints(self, disabled: set[str] | None = None) -> None:
        """Load every plugin of the entry-point group, one at a time: built-ins first (their names
        are reserved), then the rest in distribution order; skip those the user disabled (``disabled``:
        entry-point or distribution names; default ``NADBENCH_DISABLE_PLUGINS``)."""
        seen = set()
        self.disabled = disabled = _disabled() if disabled is None else set(disabled)

        def order(ep):
            dist = ep.dist.name if ep.dist else ""
            return (dist != BUILTIN, dist, ep.name)

        for ep in sorted(md.entry_points(group=GROUP), key=order):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ""
            if (ep.name, ep.value, dist) in seen:  # the same distribution on sys.path twice
                continue
            seen.add((ep.name, ep.value, dist))
            info = PluginInfo(ep.name, ep.value, dist)
            if {info.name, info.dist_name} & disabled:
                info.disabled = True
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 — a plugin must never take the registry down
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.plugins.append(info)
                info.error, info.traceback = f"{type(exc).__name__}: {exc}", traceback.format_exc()
                continue
            self.add_plugin(module, info)


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded from the entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
        _REGISTRY.load_entrypoints()
    return _REGISTRY
