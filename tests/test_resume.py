"""End to end on a real CIFAR-10 subset: a 3-cell grid (finetune, and NAD with a WRN-16-1 and a
supplied WRN-16-2 teacher) killed with SIGKILL in its second cell and run again computes only the
unfinished cells; a third run of the finished grid computes nothing; the same grid in two worker
processes and on a local Ray gives the same ACC/ASR (one thread per cell everywhere)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import own_stage_cache

DATA_ROOT = os.environ.get("NADBENCH_DATA_ROOT")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA_ROOT or not Path(DATA_ROOT).is_dir(),
                                                   reason="NADBENCH_DATA_ROOT is not set")]

GRID = ["run", "--attacks", "badnets", "--defenses", "nad,finetune", "--teachers", "wrn-16-1,wrn-16-2",
        "--threads", "1", "--no-progress", "--set", "profile.train_limit=800", "--set", "profile.test_limit=200",
        "--set", "profile.epochs=2", "--set", "profile.lr=0.1", "--set", "nad.epochs=1",
        "--set", "nad.teacher_epochs=1", "--set", "finetune.epochs=1", "--output", "out.json"]
LABELS = ["cifar10/badnets/nad/wrn-16-1/seed0", "cifar10/badnets/nad/wrn-16-1<-wrn-16-2/seed0",
          "cifar10/badnets/finetune/wrn-16-1/seed0"]


def _env(folder: Path, cache: Path | None = None) -> dict:
    """A stage cache of the folder's own (or ``cache``): each grid trains its models, none decodes
    the JPEGs again."""
    return {**os.environ, "MLFLOW_TRACKING_URI": "", "NADBENCH_CACHE": str(own_stage_cache(cache or folder / "cache"))}


def _bench(folder: Path, *extra, timeout=900, cache: Path | None = None):
    folder.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "nadbench.commands.cli", *GRID, *extra], cwd=folder,
                          env=_env(folder, cache), capture_output=True, text=True, timeout=timeout)


def _runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'nadbench.db'}")
    exp = client.get_experiment_by_name("nadbench")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def _numbers(folder: Path) -> dict:
    results = json.loads((folder / "out.json").read_text())["results"]
    return {r["cell"]["defense"] + "/" + r["cell"]["teacher"]: (r["before"], r["after"]) for r in results}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, fresh_store):
    """The grid killed in its second cell, then run again (in-process, one thread)."""
    folder = tmp_path_factory.mktemp("resume")
    fresh_store(folder)
    log = open(folder / "killed.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nadbench.commands.cli", *GRID], cwd=folder, env=_env(folder),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    # Read the store only once bench has created it (two processes creating one SQLite store at
    # once race in MLflow's schema migration).
    while "cell(s) on" not in (folder / "killed.txt").read_text():
        assert proc.poll() is None and time.time() < deadline, (folder / "killed.txt").read_text()
        time.sleep(0.3)
    while True:  # the first cell finished, the second running (training its WRN-16-2 teacher)
        assert proc.poll() is None and time.time() < deadline, (folder / "killed.txt").read_text()
        children = [r for r in _runs(folder) if "mlflow.parentRunId" in r.data.tags]
        if [r.info.status for r in children] == ["FINISHED", "RUNNING"]:
            break
        time.sleep(0.3)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    first = _runs(folder)
    start = time.perf_counter()
    second = _bench(folder)
    return folder, first, second, time.perf_counter() - start


def test_a_killed_grid_resumes_with_only_the_unfinished_cells(resumed):
    folder, first, second, _ = resumed
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r.info.status for r in first] == ["RUNNING", "FINISHED", "RUNNING"]  # parent, cell 1, cell 2
    assert "marked run" in second.stderr and "resuming: 1 cell(s) already recorded, 2 to run" in second.stderr
    runs = _runs(folder)
    assert {r.info.run_id: r.info.status for r in runs if r.info.run_id in {f.info.run_id for f in first}} == \
        {first[0].info.run_id: "KILLED", first[1].info.run_id: "FINISHED", first[2].info.run_id: "KILLED"}
    parent = runs[3]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(LABELS)
    assert {r.info.status for r in children} == {"FINISHED"}
    reused = [r for r in children if "nadbench.reused_from" in r.data.tags]
    assert [r.data.tags["nadbench.reused_from"] for r in reused] == [first[1].info.run_id]
    assert reused[0].data.metrics["after.asr"] == first[1].data.metrics["after.asr"]  # copied, not recomputed
    ran = {r.info.run_name: r.data.params for r in children if r not in reused}
    # the student's backdoored model was stored by the killed run; the teacher's (killed in training) was not
    assert ran[LABELS[1]]["backdoor.cache_hit"] == "True" and ran[LABELS[1]]["teacher.cache_hit"] == "False"
    assert ran[LABELS[1]]["model.teacher"] == "wrn-16-2" and ran[LABELS[1]]["teacher.source"] == "supplied"


def test_a_finished_grid_runs_again_in_seconds_computing_nothing(resumed):
    folder = resumed[0]
    before = _numbers(folder)
    start = time.perf_counter()
    third = _bench(folder)
    wall = time.perf_counter() - start
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming: 3 cell(s) already recorded, 0 to run" in third.stderr
    assert _numbers(folder) == before
    print(f"rerun of the finished 3-cell grid: {wall:.1f} s (process start included)")
    assert wall < 120  # generous for a slow CI machine; it computes nothing (~10 s here)


@pytest.mark.parametrize("executor", [["--workers", "2"], ["--executor", "ray"]], ids=["workers2", "ray"])
def test_workers_and_ray_give_the_in_process_numbers(resumed, tmp_path, fresh_store, executor):
    """Two workers train every model again (a cache of their own); Ray runs the cells on the models
    the in-process grid stored (its cache), so it measures Ray's cells, not the training twice."""
    fresh_store(tmp_path)
    if executor[1] == "ray":
        pytest.importorskip("ray")
    out = _bench(tmp_path, *executor, cache=resumed[0] / "cache" if executor[1] == "ray" else None)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _numbers(tmp_path) == _numbers(resumed[0])
    children = [r for r in _runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == sorted(LABELS)
    assert all("attention/attention_maps.png" in {a.path for a in _artifacts(tmp_path, r)} for r in children)


def _artifacts(folder, run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'nadbench.db'}")
    return [a for d in client.list_artifacts(run.info.run_id) if d.is_dir
            for a in client.list_artifacts(run.info.run_id, d.path)]
