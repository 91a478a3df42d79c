"""How a run computes, as a value: :class:`RunSettings` (device, precision, compile, fused, threads).

What a run computes (datasets, attacks, defenses, seeds, the profile) is its grid; how it computes is
this value, built once by its caller (``bench run`` reads its options, whose defaults come from the
environment, e.g. ``NADBENCH_PRECISION``) and carried by the :class:`~nadbench.engine.Runner` to its
stages and to worker processes. Nothing under ``core/`` writes it into the environment.

The training loop, the evaluation and the fused trainer read the settings in force
(:func:`current`): those a :func:`use` block puts in force (the Runner does, around every stage), else
the process default (:func:`set_default`; ``RunSettings()`` unless a script or the test suite sets
another). Plugins therefore keep calling ``train(...)`` without passing them.

Which fields enter stage keys: precision (as resolved on the device), channels-last and compile
change a trained model's weights, and fused changes which code trains it, so they are in every train
key (``nadbench.training.train.numerics``); the device type is too. ``threads`` is not: CPU results move in
their last bits with the number of threads, and a key that held it would retrain every model when a
grid is spread over workers; pin ``--threads`` to compare runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

PRECISIONS = ("auto", "float32", "bf16")


@lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """Whether this CPU executes bfloat16 natively (AVX512-BF16 or AMX). Elsewhere PyTorch emulates
    bf16 on the CPU, many times slower than float32 (benchmarks/results/precision-cuda.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class RunSettings:
    """How a run computes. ``precision``: ``auto`` is bf16 autocast on CPUs with native bf16 and
    float32 elsewhere, CUDA included (these small networks are launch-bound there, and bf16's casts
    are extra kernels: benchmarks/results/speed-cuda.md); ``float32`` or ``bf16`` force it.
    ``compile``: ``torch.compile`` the plain cross-entropy phases. ``fused``: train a grid's models
    as stacked models before its cells run (:mod:`nadbench.training.fused`), at most ``fused_max`` per group.
    ``threads``: CPU threads per cell (None: torch's default)."""

    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    fused: bool = False
    fused_max: int = 14
    threads: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.fused_max < 1:
            raise ValueError(f"fused_max {self.fused_max}; it must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads}; it must be at least 1 (or None: torch's default)")

    def replace(self, **changes) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    def precision_on(self, device_type: str) -> str:
        """``bf16`` or ``float32`` on a device of this type (``auto`` resolved)."""
        if self.precision == "auto":
            return "bf16" if device_type == "cpu" and native_bf16_cpu() else "float32"
        return self.precision


_DEFAULT = [RunSettings()]
_IN_FORCE: contextvars.ContextVar[RunSettings | None] = contextvars.ContextVar("nadbench_run_settings",
                                                                              default=None)


def current() -> RunSettings:
    """The settings in force: the innermost :func:`use`, else the process default."""
    return _IN_FORCE.get() or _DEFAULT[0]


def set_default(settings: RunSettings) -> RunSettings:
    """Make ``settings`` the process default (a script's or a test session's); returns the old one."""
    old, _DEFAULT[0] = _DEFAULT[0], settings
    return old


@contextlib.contextmanager
def use(settings: RunSettings) -> Iterator[RunSettings]:
    """Put ``settings`` in force for the block (the Runner, around each stage it runs)."""
    token = _IN_FORCE.set(settings)
    try:
        yield settings
    finally:
        _IN_FORCE.reset(token)
