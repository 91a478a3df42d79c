"""Every environment variable nadbench writes, in one module (``tests/test_settings.py`` pins the list).

nadbench reads its own settings (``NADBENCH_*``) only as defaults: the CLI's options, the data root
and the cache folder. It never writes them: how a run computes travels as a value
(:class:`nadbench.training.settings.RunSettings`). What is written here is for other code that reads only
the environment: CUDA, in a worker process before it starts, and MLflow's client and UI. Each is a
default (``setdefault``) except a worker's GPU, which is its slot.
"""
from __future__ import annotations

import os

WRITES = (
    "CUDA_VISIBLE_DEVICES",                  # a local worker's GPU slot (executors)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",       # a tracking server: a bounded number of retries ...
    "MLFLOW_HTTP_REQUEST_TIMEOUT",           # ... instead of minutes of silent back-off
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",  # no MLflow bar inside nadbench's own
    "MLFLOW_ALLOW_FILE_STORE",               # `bench ui` on an SQLite store
)


def gpu_slot(slot: str) -> None:
    """A worker process's one GPU, set before CUDA starts."""
    os.environ["CUDA_VISIBLE_DEVICES"] = slot


def mlflow_http() -> None:
    """A tracking server's client: a bounded number of retries and a request timeout."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def mlflow_quiet() -> None:
    """No MLflow progress bar for artifact uploads."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def mlflow_ui() -> None:
    """What ``mlflow ui`` needs for an SQLite store with a file artifact root."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
