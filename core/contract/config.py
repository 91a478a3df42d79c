"""Typed plugin configs: frozen dataclasses whose field metadata carries help text and valid range.

One declaration feeds `bench list`, `--set` parsing, validation errors and the MLflow params.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the valid choices or range."""


class PluginError(RuntimeError):
    """A registry-level error: unknown or ambiguous names, broken plugin contracts. (Defined here,
    with ConfigError, so that modules stages run need not import the registry.)"""


# The value types a config field may hold: what `--set` can parse and MLflow can record.
SCALARS = (bool, int, float, str)


PATH_KINDS = ("file", "folder")


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, min_exclusive: bool = False, nonempty: bool = False,
          path: str | None = None, integer: bool = False) -> Any:
    """A config field with help text and an optional valid range or set of choices.

    ``min_exclusive``: the value must be strictly greater than ``min`` (e.g. a share in (0, 1]).
    ``nonempty``: a tuple field that must hold at least one item (e.g. the rows of a trigger).
    ``path``: "file" or "folder" for a field that names one (e.g. a trigger image): stage keys then
    hold the content, not the name, so replacing the file recomputes what was made from it.
    ``integer``: an optional (None by default) field whose value must be a whole number.
    """
    if path not in (None, *PATH_KINDS):
        raise ValueError(f"param(path={path!r}): valid: {', '.join(PATH_KINDS)}")
    return dataclasses.field(default=default, metadata={
        "help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive,
        "nonempty": nonempty, "path": path, "integer": integer})


def _range_text(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    lo, hi = meta.get("min"), meta.get("max")
    opening = "(" if meta.get("min_exclusive") else "["
    if lo is not None and hi is not None:
        return f"in {opening}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _below_min(value: Any, meta: dict) -> bool:
    lo = meta.get("min")
    return lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo)


def check_fields(cls: type) -> None:
    """Raise ``ConfigError`` unless ``cls`` is a dataclass whose every field holds a supported value
    (bool, int, float, str, None, or a tuple of those): the contract `--set` and MLflow rely on."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"Config {cls!r} must be a dataclass (use @dataclass(frozen=True) and param())")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field {f.name!r} has no default (every field needs one)")
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        items = value if isinstance(value, tuple) else (value,)
        if not all(v is None or isinstance(v, SCALARS) for v in items):
            raise ConfigError(f"config field {f.name!r} holds {type(value).__name__} {value!r}: supported "
                              "types are bool, int, float, str, None and tuples of these")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` against its declared range or choices."""
    for f in dataclasses.fields(cfg):
        value, meta, name = getattr(cfg, f.name), f.metadata, f"{prefix}{f.name}"
        items = value if isinstance(value, tuple) else (value,)
        if meta.get("nonempty") and isinstance(value, tuple) and not value:
            raise ConfigError(f"{name} is empty: it needs at least one value")
        if meta.get("path") and isinstance(value, str) and value:
            found = Path(value).expanduser()
            if not (found.is_dir() if meta["path"] == "folder" else found.is_file()):
                raise ConfigError(f"{name} = {value!r} is invalid: no such {meta['path']}")
        for v in items:
            if meta.get("choices") and v not in meta["choices"]:
                raise ConfigError(f"{name} = {v!r} is invalid: must be {_range_text(meta)}")
            if v is None or isinstance(v, (str, bool)):
                continue
            if meta.get("integer") and not isinstance(v, int):
                raise ConfigError(f"{name} = {v!r} is invalid: must be a whole number")
            if _below_min(v, meta) or (meta.get("max") is not None and v > meta["max"]):
                raise ConfigError(f"{name} = {v!r} is out of range: must be {_range_text(meta)}")


def _parse(text: str, default: Any, name: str) -> Any:
    if isinstance(default, tuple):
        parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
        if not default:  # nothing to learn the item type from: numbers where they parse
            return tuple(_parse(p, None, name) for p in parts)
        return tuple(_parse(p, type(default[0])(), name) for p in parts)
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{name} = {text!r} is not a valid {type(default).__name__}") from None
    if default is None:  # optional fields: "none" clears, numbers parse as numbers
        if text.lower() == "none":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def build(cls: type, overrides: dict[str, str] | None = None, prefix: str = "") -> Any:
    """Instantiate config ``cls`` from string overrides (as typed on the command line) and validate."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, text in overrides.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key} is not a field; valid fields: {', '.join(fields)}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values[key] = _parse(text, default, prefix + key) if isinstance(text, str) else text
    cfg = cls(**values)
    validate(cfg, prefix)
    return cfg


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(field, default, help with range) rows for `bench list`."""
    rows = []
    for f in dataclasses.fields(cls):
        rng = _range_text(f.metadata)
        help_ = f.metadata.get("help", "") + (f" ({rng})" if rng else "") + (
            " (not empty)" if f.metadata.get("nonempty") else "")
        rows.append((f.name, f.default, help_))
    return rows


def flatten(cfg: Any, prefix: str) -> dict[str, Any]:
    """Flat dotted params for MLflow: ``{prefix.field: value}``."""
    return {f"{prefix}.{k}": (",".join(map(str, v)) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()}


def key_values(cfg: Any) -> dict[str, Any]:
    """A config as stage keys hold it: its values, with every field declared ``path=`` replaced by
    a digest of what the file or folder holds (an empty value stays as it is)."""
    values = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("path") and values[f.name]:
            values[f.name] = {"sha256": content_digest(values[f.name])}
    return values


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order).
    A missing path digests as such: the stage that reads it reports it."""
    import hashlib

    root = Path(path).expanduser()
    digest = hashlib.sha256()
    if root.is_file():
        digest.update(root.read_bytes())
    elif root.is_dir():
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(root).as_posix()}\n".encode())
            digest.update(file.read_bytes())
    else:
        digest.update(f"missing:{root}".encode())
    return digest.hexdigest()
