"""Plugin discovery: every plugin, built-in or third-party, comes through the `nadbench`
entry-point group and registers its items through `register_*(register)` hooks.

Unlike pluggy's `load_setuptools_entrypoints`, entry points are loaded one by one: a plugin that
fails to import or to register is recorded (name, distribution, traceback) and skipped, and the
rest of the registry keeps working.
"""
from __future__ import annotations

import importlib.metadata as md
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from . import hookspecs
from .api import Attack, DatasetSpec, Defense, ModelSpec

GROUP = "nadbench"
KINDS = ("datasets", "models", "attacks", "defenses")
_TYPES = {"datasets": DatasetSpec, "models": ModelSpec, "attacks": Attack, "defenses": Defense}


class PluginError(RuntimeError):
    """A registry-level error: duplicate names, unknown names, hooks with no spec."""


@dataclass
class PluginInfo:
    name: str             # entry-point name
    value: str            # module path
    distribution: str     # "nadbench 0.1.0", or "" when not installed as a distribution
    hooks: list[str] = field(default_factory=list)
    error: str | None = None       # one line
    traceback: str | None = None   # the whole story, for `bench plugins --verbose`


class Registry:
    """The registered datasets, models, attacks and defenses, each tagged with its provider."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self.plugins: list[PluginInfo] = []
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)

    # -- lookup -------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.items[kind])

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.items[kind][name]
        except KeyError:
            valid = ", ".join(self.names(kind)) or "(none registered)"
            raise PluginError(f"unknown {kind[:-1]} {name!r}; valid {kind}: {valid}") from None

    def attack(self, name: str) -> type[Attack]:
        return self.get("attacks", name)

    def defense(self, name: str) -> type[Defense]:
        return self.get("defenses", name)

    def model(self, name: str) -> ModelSpec:
        return self.get("models", name)

    def dataset(self, name: str) -> DatasetSpec:
        return self.get("datasets", name)

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    # -- loading ------------------------------------------------------------------------------
    def add_plugin(self, module: Any, info: PluginInfo) -> None:
        """Register one plugin object (a module with hook implementations) and collect its items.

        Everything a plugin registers is validated here; on any error the plugin is unregistered
        again, its partial items are dropped, and the error is recorded on ``info``.
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
        added: list[tuple[str, str]] = []
        try:
            for kind in KINDS:
                hook = getattr(self.pm.hook, f"register_{kind}")
                impls = [i for i in hook.get_hookimpls() if i.plugin is module]
                for impl in impls:
                    impl.function(register=self._register_fn(kind, info, added))
        except Exception as exc:
            for kind, name in added:
                del self.items[kind][name]
            self.pm.unregister(module)
            info.error, info.traceback = f"{type(exc).__name__}: {exc}", traceback.format_exc()

    def _register_fn(self, kind: str, info: PluginInfo, added: list):
        expected = _TYPES[kind]
        provider = info.distribution or info.name

        def register(item: Any) -> None:
            ok = isinstance(item, type) and issubclass(item, expected) if kind in ("attacks", "defenses") \
                else isinstance(item, expected)
            if not ok:
                raise PluginError(f"register_{kind} got {item!r}; expected "
                                  f"{'a subclass of' if kind in ('attacks', 'defenses') else 'an instance of'} "
                                  f"nadbench.{expected.__name__}")
            name = item.name
            if name in self.items[kind]:
                other = self.items[kind][name].provider
                raise PluginError(f"duplicate {kind[:-1]} name {name!r}: registered by {other} "
                                  f"and again by {provider}")
            if kind in ("attacks", "defenses"):
                item.provider = provider
            else:
                item = replace(item, provider=provider)
            self.items[kind][name] = item
            added.append((kind, name))
        return register

    def load_entrypoints(self) -> None:
        """Load every plugin of the entry-point group, one at a time."""
        seen = set()
        for ep in sorted(md.entry_points(group=GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ""
            if (ep.name, ep.value, dist) in seen:  # the same distribution on sys.path twice
                continue
            seen.add((ep.name, ep.value, dist))
            info = PluginInfo(ep.name, ep.value, dist)
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
