"""MLflow tracking: one parent run per `bench run`, one child run per grid cell.

Names (one scheme everywhere): params are flat dotted names (``attack.name``,
``attack.poison_rate``, ``defense.name``, ``model.student``, ``model.teacher``, ``seed``,
``profile.*``); metrics are ``acc`` / ``asr`` with a phase prefix (``before.acc``, ``after.asr``),
wall times ``time.<phase>_s``, per-epoch losses ``<phase>.loss`` with the epoch as step;
artifacts live in ``attention/``, ``samples/`` and ``model/`` (safetensors state dicts).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from . import environment

DEFAULT_DB = "nadbench.db"
DEFAULT_EXPERIMENT = "nadbench"
DEFAULT_TIMEOUT = 5.0  # seconds for the one reachability check of a tracking server
HEARTBEAT_S = 60.0     # how often a process stamps its open runs
DEFAULT_STALE_AFTER = 1800.0  # a run of another host without a heartbeat this long is KILLED
HOST = socket.gethostname()


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, Linux), to tell a live process from a
    later one that reuses its pid; None when there is no such process or no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    if Path("/proc").is_dir():
        now = _process_start(pid)
        return now is not None and (not start or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_store(uri: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Fail fast, before anything trains: one bounded reachability check of a tracking server, or a
    check that an SQLite store's folder exists and is writable. Raises ``TrackingError``."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        environment.mlflow_http()  # later MLflow calls: bounded retries, not minutes of back-off
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}; one try, {timeout:g} s timeout): "
                f"start it (`mlflow server --host 127.0.0.1 --port PORT`) or drop --tracking-uri / "
                f"MLFLOW_TRACKING_URI to use the local store sqlite:///./{DEFAULT_DB}") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        folder = path.parent
        problem = (f"its folder {folder} does not exist (or is not a folder)" if not folder.is_dir() else
                   f"{path} is not a file" if path.exists() and not path.is_file() else
                   f"{folder} is not writable" if not os.access(folder, os.W_OK) else
                   f"{path} is not writable" if path.exists() and not os.access(path, os.W_OK) else None)
        if problem:
            raise TrackingError(f"cannot use the tracking store {uri}: {problem}. Create the folder or "
                                f"point --tracking-uri / MLFLOW_TRACKING_URI at a writable place "
                                f"(e.g. sqlite:///./{DEFAULT_DB})")


def default_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an ``flock`` on ``<db>.lock`` beside an SQLite store, so that processes opening it at
    once take turns: MLflow creates and migrates a new store's schema with no lock of its own, and
    two migrations at once die ("duplicate column name", "table ... already exists"). A tracking
    server serialises its own clients: no lock for any other URI."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri[len("sqlite:///"):] + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def artifact_root(uri: str) -> str:
    """Artifacts go beside an SQLite store (``<dir>/mlartifacts``); the working directory otherwise."""
    if uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///"):]).resolve().parent
    else:
        base = Path.cwd()
    return (base / "mlartifacts").as_uri()


class Tracker:
    """A thin layer over ``MlflowClient``: explicit run ids, no fluent global state."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 timeout: float = DEFAULT_TIMEOUT):
        environment.mlflow_quiet()
        self.uri = uri or default_uri()
        check_store(self.uri, timeout)
        import mlflow
        from mlflow.tracking import MlflowClient

        try:
            mlflow.set_tracking_uri(self.uri)
            # MlflowClient() builds the store, which creates / migrates a new SQLite schema; under
            # the lock, so is the get-or-create of the experiment.
            with store_lock(self.uri):
                self.client = MlflowClient(self.uri)
                exp_id = self._experiment(experiment)
        except Exception as exc:  # noqa: BLE001 — one line that names the store, not a long traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TrackingError(f"cannot use the tracking store {self.uri}: {type(exc).__name__}: "
                                f"{first[:300]}") from None
        self.experiment_id, self.experiment_name = exp_id, experiment
        self._open: set[str] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="nadbench-heartbeat", daemon=True).start()

    def _experiment(self, name: str) -> str:
        """The id of the experiment ``name``, created if there is none. Another process may create
        it between the look-up and the creation (a tracking server holds no lock of ours): then
        the creation fails and the look-up, repeated, finds theirs."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=f"{artifact_root(self.uri)}/{name}")
            except Exception:  # noqa: BLE001 — MLflow's RESOURCE_ALREADY_EXISTS; anything else re-raises
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        return exp.experiment_id

    def reap(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[str]:
        """Mark KILLED the runs left RUNNING by a process that is gone: on this host, its pid no
        longer exists (SIGKILL, a reboot); on another host, it sent no heartbeat for ``stale_after``
        seconds (a run's process beats every ``HEARTBEAT_S``). A run of a live process is never
        touched. Returns the ids of the runs marked."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                       max_results=5000)
        marked, now = [], time.time()
        for run in runs:
            tags = run.data.tags
            if "nadbench.pid" not in tags:
                continue  # not a nadbench run
            if tags.get("nadbench.host") == HOST:
                if not tags["nadbench.pid"].isdigit() or _alive(int(tags["nadbench.pid"]), tags.get("nadbench.pid_start")):
                    continue
                reason = f"process {tags['nadbench.pid']} on {HOST} ended without closing the run"
            else:
                beat = float(tags.get("nadbench.heartbeat") or run.info.start_time / 1000)
                if now - beat < stale_after:
                    continue
                reason = (f"no heartbeat from process {tags['nadbench.pid']} on {tags.get('nadbench.host')} "
                          f"for {now - beat:.0f} s (limit {stale_after:g} s)")
            self.client.set_tag(run.info.run_id, "nadbench.end_reason", reason)
            self.client.set_terminated(run.info.run_id, "KILLED")
            marked.append(run.info.run_id)
        return marked

    def _beat(self) -> None:
        """Every HEARTBEAT_S, stamp ``nadbench.heartbeat`` on this process's open runs, so another
        host can tell a live grid from one whose machine died."""
        while not self._stop.wait(HEARTBEAT_S):
            for run_id in list(self._open):
                try:
                    self.client.set_tag(run_id, "nadbench.heartbeat", f"{time.time():.0f}")
                except Exception:  # noqa: BLE001 — a missed beat is harmless; the next one retries
                    pass

    # -- resume: a finished cell is found by its key and linked, not recomputed ------------------
    def finished_cell(self, key: str):
        """The newest FINISHED run that recorded the cell with this key, or None."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`nadbench.cell_key` = '{key}' and attributes.status = 'FINISHED'",
            max_results=20, order_by=["attributes.start_time DESC"])
        return next((r for r in runs if "nadbench.result" in r.data.tags), None)

    def reuse(self, run, name: str, parent: str | None) -> dict[str, Any]:
        """Record a finished cell under ``parent`` without recomputing it: a child run with the
        original's params and final metrics (so the parent's table is complete on its own) and a
        ``nadbench.reused_from`` tag naming the run that holds the artifacts. Returns its result."""
        tags = run.data.tags
        origin = tags.get("nadbench.reused_from", run.info.run_id)
        result = {**json.loads(tags["nadbench.result"]), "reused_from": origin}
        run_id = self.start(name, dict(run.data.params), parent=parent, tags={
            "nadbench.cell_key": tags["nadbench.cell_key"], "nadbench.reused_from": origin,
            "nadbench.result": tags["nadbench.result"]})
        self.metrics(run_id, run.data.metrics)
        self.end(run_id)
        return result

    def grid_results(self, run_id: str | None = None):
        """(parent run, results of its finished cells) of a `bench run`: the run ``run_id``, or the
        newest grid in the experiment."""
        if run_id is None:
            runs = self.client.search_runs([self.experiment_id], "tags.`nadbench.grid` = '1'", max_results=1,
                                           order_by=["attributes.start_time DESC"])
            if not runs:
                raise TrackingError(f"no `bench run` grid in experiment {self.experiment_name!r} of {self.uri}")
            parent = runs[0]
        else:
            try:
                parent = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 — MLflow raises its own exception types
                raise TrackingError(f"no run {run_id!r} in {self.uri}") from None
        results = []
        for c in self.children(parent):
            if "nadbench.result" in c.data.tags:  # results recorded before they named their profile: the run's
                result = json.loads(c.data.tags["nadbench.result"])
                results.append({"profile": c.data.params.get("profile.name"), **result})
        return parent, results

    def children(self, parent) -> list:
        """The cell runs of a grid's parent run, oldest first."""
        return self.client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                       max_results=50000, order_by=["attributes.start_time ASC"])

    def start(self, name: str, params: dict[str, Any] | None = None, parent: str | None = None,
              tags: dict[str, str] | None = None) -> str:
        pid = os.getpid()
        tags = {"nadbench.host": HOST, "nadbench.pid": str(pid), "nadbench.pid_start": _process_start(pid) or "",
                "nadbench.heartbeat": f"{time.time():.0f}", **(tags or {})}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._open.add(run.info.run_id)
        if params:
            self.params(run.info.run_id, params)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0)
                                               for k, v in metrics.items()])

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def figure(self, run_id: str, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self.artifact(run_id, buf.getvalue(), path)

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
        buf = io.BytesIO()
        pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(buf, format="png")
        self.artifact(run_id, buf.getvalue(), path)

    def text(self, run_id: str, text: str, path: str) -> None:
        self.artifact(run_id, text.encode(), path)

    def weights(self, run_id: str, model, path: str, metadata: dict[str, str] | None = None) -> None:
        """Log a model as a safetensors state dict under ``path`` (e.g. ``model/backdoored.safetensors``)."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        self.artifact(run_id, save(state, metadata), path)

    def artifact(self, run_id: str, data: bytes, path: str) -> None:
        """Every artifact goes through here: ``data`` stored as ``path`` in the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(path).name
            file.write_bytes(data)
            parent = str(Path(path).parent)
            self.client.log_artifact(run_id, str(file), None if parent == "." else parent)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
        self._open.discard(run_id)

    def ui_link(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}?workflowType=machine_learning"


class Recorder(Tracker):
    """A tracker for worker processes: records every call (artifacts as bytes) instead of writing
    to MLflow, so only the driver writes to the store; ``replay`` applies the record to a real
    tracker. The cell's run is opened by the driver and passed in as ``run_id``."""

    def __init__(self):  # noqa: D107 — no store, no heartbeat
        self.ops: list[tuple] = []

    def start(self, name, params=None, parent=None, tags=None) -> str:
        raise RuntimeError("a worker never opens runs: the driver opens the cell's run")

    def params(self, run_id, params):
        self.ops.append(("params", {k: str(v) for k, v in params.items()}))

    def metrics(self, run_id, metrics, step=None):
        self.ops.append(("metrics", dict(metrics), step))

    def tag(self, run_id, key, value):
        self.ops.append(("tag", key, value))

    def artifact(self, run_id, data, path):
        self.ops.append(("artifact", data, path))

    def end(self, run_id, status="FINISHED"):
        self.ops.append(("end", status))


def replay(tracker: Tracker, run_id: str, ops: list[tuple]) -> None:
    """Apply a worker's record to the run ``run_id`` (params, metrics, tags, artifacts, its end)."""
    for op, *args in ops:
        if op == "params":
            tracker.params(run_id, args[0])
        elif op == "metrics":
            tracker.metrics(run_id, args[0], args[1])
        elif op == "tag":
            tracker.tag(run_id, *args)
        elif op == "artifact":
            tracker.artifact(run_id, *args)
        elif op == "end":
            tracker.end(run_id, args[0])
