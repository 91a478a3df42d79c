"""MLflow tracking: one parent run per `bench run`, one child run per grid cell.

Names (one scheme everywhere): params are flat dotted names (``attack.name``,
``attack.poison_rate``, ``defense.name``, ``model.student``, ``model.teacher``, ``seed``,
``profile.*``); metrics are ``acc`` / ``asr`` with a phase prefix (``before.acc``, ``after.asr``),
wall times ``time.<phase>_s``, per-epoch losses ``<phase>.loss`` with the epoch as step;
artifacts live in ``attention/``, ``samples/`` and ``model/`` (safetensors state dicts).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_DB = "nadbench.db"
DEFAULT_EXPERIMENT = "nadbench"


def default_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def artifact_root(uri: str) -> str:
    """Artifacts go beside an SQLite store (``<dir>/mlartifacts``); the working directory otherwise."""
    if uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///"):]).resolve().parent
    else:
        base = Path.cwd()
    return (base / "mlartifacts").as_uri()


class Tracker:
    """A thin layer over ``MlflowClient``: explicit run ids, no fluent global state."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(
                experiment, artifact_location=f"{artifact_root(self.uri)}/{experiment}")
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id

    def start(self, name: str, params: dict[str, Any] | None = None, parent: str | None = None,
              tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.params(run.info.run_id, params)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0)
                                               for k, v in metrics.items()])

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def figure(self, run_id: str, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id, fig, path)
        plt.close(fig)

    def image(self, run_id: str, image, path: str) -> None:
        """A matplotlib figure, or a uint8 (C, H, W) tensor (upscaled so a person can see it)."""
        if hasattr(image, "savefig"):
            self.figure(run_id, image, path)
            return
        import numpy as np
        from PIL import Image

        array = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)
        pil = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
        scale = max(1, 256 // max(pil.size))
        self.client.log_image(run_id, pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST),
                              artifact_file=path)

    def text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def weights(self, run_id: str, model, path: str, metadata: dict[str, str] | None = None) -> None:
        """Log a model as a safetensors state dict under ``path`` (e.g. ``model/backdoored.safetensors``)."""
        from .models import save_weights

        with tempfile.TemporaryDirectory() as tmp:
            file = save_weights(model, Path(tmp) / Path(path).name, metadata)
            self.client.log_artifact(run_id, str(file), str(Path(path).parent))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def ui_link(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}?workflowType=machine_learning"
