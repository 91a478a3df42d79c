"""The content-keyed stage store: each stage's output lives under a key that hashes every input
that changes it, in ``<cache>/<stage>/<key>.safetensors``, with the full key text in the file's
metadata (a cell's own result is recorded in MLflow under its cell key: ``Tracker.finished_cell``).
Writes are atomic (a unique temporary file in the same folder, then a rename) and a per-key lock makes concurrent processes (``--workers``, Ray tasks sharing the
folder) compute a stage once: the others wait and then read it. An entry that is unreadable,
truncated or written for another key is reported and recomputed, never trusted.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..training.models import save_tensors

def stage_key(stage: str, parts: dict[str, Any]) -> tuple[str, str]:
    """(short key, full key text) of a stage: a sha256 over the canonical JSON of its inputs, the code of
    its stage module among them (core/plan.py, core/codehash.py)."""
    text = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], text


class Store:
    """Stage outputs by key under ``root`` (the ``models`` / ``poison`` / ... folders of the cache)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str, suffix: str = ".safetensors") -> Path:
        return self.root / stage / f"{key}{suffix}"

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the key's lock (an ``flock`` on ``<key>.lock``): one process computes, others wait."""
        path = self.path(stage, key, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def forget(self, stage: str, key: str) -> None:
        """Remove an entry (``bench run --rerun all``), under its lock."""
        with self.lock(stage, key):
            self.path(stage, key).unlink(missing_ok=True)

    # -- tensors ------------------------------------------------------------------------------
    def load_tensors(self, stage: str, key: str, text: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) of the entry, or None when there is none or it cannot be trusted."""
        path = self.path(stage, key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != text:
                raise ValueError("it was written for another key (its metadata does not match)")
            return load_file(str(path)), meta
        except Exception as exc:  # noqa: BLE001 — a bad entry is never fatal and never trusted
            _report(path, exc)
            return None

    def save_tensors(self, stage: str, key: str, text: str, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
        return save_tensors(tensors, self.path(stage, key), {**(metadata or {}), "key": text})


def _report(path: Path, exc: Exception) -> None:
    warnings.warn(f"ignoring cache entry {path}: {type(exc).__name__}: {exc}; recomputing it", stacklevel=3)


class StageCache:
    """The one cache every stage goes through (:meth:`get`): this process's memory, then the store
    (under the key's lock, so processes sharing the folder compute a stage once), then the stage's
    computation, stored. ``counts[stage, how]`` counts the lookups by how they were served:
    ``"memory"``, ``"loaded"`` or ``"computed"``."""

    def __init__(self, store: Store):
        self.store = store
        self.memory: dict[str, dict[str, Any]] = {}
        self.counts: collections.Counter = collections.Counter()

    def get(self, stage: str, key: tuple[str, str], compute: Callable[[], tuple[Any, dict[str, torch.Tensor]]],
            load: Callable[[dict[str, torch.Tensor]], Any] = lambda tensors: tensors,
            metadata: dict[str, str] | None = None) -> tuple[Any, bool]:
        """(the stage's value for ``key``, whether it was stored). ``compute()`` returns the value and
        the tensors to store; ``load(tensors)`` makes the value from a stored entry, or None when the
        entry does not fit (it is then recomputed). ``metadata`` is stored beside the tensors, with the
        seconds the computation took."""
        k, text = key
        memo = self.memory.setdefault(stage, {})
        if k in memo:
            self.counts[stage, "memory"] += 1
            return memo[k], True
        with self.store.lock(stage, k):
            stored = self.store.load_tensors(stage, k, text)
            value = load(stored[0]) if stored is not None else None
            hit = value is not None
            if hit:
                self.counts[stage, "loaded"] += 1
            else:
                start = time.perf_counter()
                value, tensors = compute()
                self.put(stage, key, value, tensors, {**(metadata or {}),
                                                      "seconds": f"{time.perf_counter() - start:.1f}"})
        memo[k] = value
        return value, hit

    def put(self, stage: str, key: tuple[str, str], value: Any, tensors: dict[str, torch.Tensor],
            metadata: dict[str, str] | None = None) -> None:
        """Store a value computed elsewhere (the fused trainer's models), counted as computed."""
        self.store.save_tensors(stage, *key, tensors, metadata)
        self.memory.setdefault(stage, {})[key[0]] = value
        self.counts[stage, "computed"] += 1

    def has(self, stage: str, key: str) -> bool:
        return key in self.memory.get(stage, {}) or self.store.path(stage, key).exists()

    def forget(self, stage: str, key: str) -> None:
        """Remove an entry (``bench run --rerun all``) from memory and the store."""
        self.memory.get(stage, {}).pop(key, None)
        self.store.forget(stage, key)
