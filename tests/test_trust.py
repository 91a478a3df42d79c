"""Results you can trust: verified cache entries keyed by the plugins' code, failures that name
their cause before anything trains, data errors with a run of their own, and signals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nadbench import Defense, ModelSpec
from nadbench.engine import Cell, Runner, check_grid, profile
from nadbench.training.models import build, save_weights
from nadbench.plugins.defenses.finetune import FinetuneConfig
from nadbench.plugins.models.wideresnet import WideResNet
from nadbench.engine.registry import PluginError
from nadbench.engine.tracking import Tracker

DATA_ROOT = os.environ.get("NADBENCH_DATA_ROOT")
needs_data = pytest.mark.skipif(not DATA_ROOT or not Path(DATA_ROOT).is_dir(),
                                reason="NADBENCH_DATA_ROOT is not set to the folder holding the CIFAR-10 archive")


class ReturnsNothing(Defense):
    name = "returns-nothing"
    Config = FinetuneConfig
    description = "a broken defense: defend() forgets to return"

    def defend(self, model, clean, ctx):
        model.zero_grad()


@pytest.fixture
def registry(toy_registry):
    """The installed plugins plus a toy dataset, a model with missing attention layers and a
    defense that returns nothing."""
    return toy_registry(models=[ModelSpec("ghost-layers", WideResNet, attention_layers=("block1", "block9"))],
                        defenses=[ReturnsNothing])


CELL = Cell("toy", "badnets", "finetune", "wrn-16-1", "wrn-16-1", 0)


def _runner(reg, tmp_path):
    prof = profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    return Runner(reg, prof, device=torch.device("cpu"), progress=False, cache_dir=tmp_path)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cache_entries_are_verified_and_recomputed(registry, tmp_path):
    model, _, hit = _runner(registry, tmp_path).backdoored(CELL)
    assert not hit
    trained = _weights(model)
    [path] = (tmp_path / "models").glob("*.safetensors")
    assert _runner(registry, tmp_path).backdoored(CELL)[2]  # a valid entry is used

    # another model's valid weights placed under this key: refused, named, recomputed
    torch.manual_seed(5)
    save_weights(build(registry.model("wrn-16-1"), registry.dataset("toy")), path, {"key": "another model"})
    with pytest.warns(UserWarning, match=f"ignoring cache entry {path}.*another key"):
        model, _, hit = _runner(registry, tmp_path).backdoored(CELL)
    assert not hit and all(torch.equal(trained[k], v) for k, v in model.state_dict().items())

    # a truncated file: reported with its path, recomputed, never fatal
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=f"ignoring cache entry {path}"):
        model, _, hit = _runner(registry, tmp_path).backdoored(CELL)
    assert not hit and all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert _runner(registry, tmp_path).backdoored(CELL)[2]  # and the rewritten entry is good again


def test_cache_key_follows_the_plugins_code_and_version(registry, tmp_path, monkeypatch):
    _runner(registry, tmp_path).backdoored(CELL)
    badnets = registry.attack("badnets")
    monkeypatch.setattr(badnets, "source_hash", "edited")  # what an edit of the plugin's module does
    assert not _runner(registry, tmp_path).backdoored(CELL)[2]
    monkeypatch.setattr(badnets, "provider", "nadbench 9.9")  # a new release
    assert not _runner(registry, tmp_path).backdoored(CELL)[2]
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 3


def test_contract_mistakes_are_named_at_first_use(registry, tmp_path):
    with pytest.raises(PluginError, match=r"model 'ghost-layers' \(toy-dist 0.1\) breaks the plugin contract: "
                                          r"its declared attention layers net.block9 do not exist"):
        check_grid(registry, [Cell("toy", "badnets", "nad", "ghost-layers", "ghost-layers", 0)], {})
    cell = Cell("toy", "badnets", "returns-nothing", "wrn-16-1", "wrn-16-1", 0)
    with pytest.raises(PluginError, match=r"defense 'returns-nothing' \(toy-dist 0.1\) breaks the plugin "
                                          r"contract: defend\(\) must return the repaired nn.Module \(or a Defended "
                                          r"holding modules\), it returned None"):
        _runner(registry, tmp_path).run_cell(cell)


def test_check_grid_validates_betas_against_each_pair(registry):
    from nadbench.contract.config import ConfigError

    cells = [Cell("toy", "badnets", "nad", "wrn-16-1", "preact-resnet18", 0)]
    check_grid(registry, cells, {})
    with pytest.raises(ConfigError, match="nad.betas has 2 value"):
        check_grid(registry, cells, {"nad": {"betas": "1,2"}})


def _bench(*args, cwd, timeout=600, **popen):
    return subprocess.run([sys.executable, "-m", "nadbench.commands.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MLFLOW_TRACKING_URI": ""}, **popen)


def test_unreachable_tracking_store_fails_fast_in_one_line(tmp_path):
    start = time.perf_counter()
    out = _bench("run", "--tracking-uri", "http://127.0.0.1:1", "--tracking-timeout", "3", cwd=tmp_path)
    assert time.perf_counter() - start < 60  # was 105-252 s of silent retries
    assert out.returncode == 1
    error = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "cannot reach the MLflow tracking server at http://127.0.0.1:1" in error[0]
    (tmp_path / "afile").write_text("")
    out = _bench("run", "--tracking-uri", f"sqlite:///{tmp_path}/afile/x.db", cwd=tmp_path)
    assert out.returncode == 1 and f"cannot use the tracking store sqlite:///{tmp_path}/afile/x.db" in out.stderr
    assert not list(tmp_path.glob("*.db"))


def test_a_missing_data_root_is_an_error_not_a_download_target(tmp_path):
    from nadbench.training.data import DataError, load_dataset

    with pytest.raises(DataError, match="data root .*typo does not exist"):
        load_dataset("cifar10", tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    out = _bench("run", "--data-root", str(tmp_path / "typo"), cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr and not (tmp_path / "typo").exists()


def _child_runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("nadbench")
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if "mlflow.parentRunId" in r.data.tags], \
        [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


@needs_data
def test_a_truncated_archive_names_the_file_and_fails_its_cell(tmp_path, fresh_store):
    fresh_store(tmp_path)
    archive = Path(DATA_ROOT) / "cifar10-jpeg.tar.xz"
    root = tmp_path / "data"
    root.mkdir()
    (root / archive.name).write_bytes(archive.read_bytes()[:2_000_000])
    out = _bench("run", "--data-root", str(root), "--defenses", "finetune", "--no-progress", cwd=tmp_path)
    assert out.returncode == 1
    assert f"cannot read dataset 'cifar10' from {root / archive.name}" in out.stderr
    assert "truncated or corrupt" in out.stderr and "sha256sum -c SHA256SUMS" in out.stderr
    client, children, _ = _child_runs(tmp_path / "nadbench.db")
    assert [r.info.status for r in children] == ["FAILED"]
    assert "error.txt" in {a.path for a in client.list_artifacts(children[0].info.run_id)}


# A grid long enough to be interrupted in its first cell (a few seconds per epoch).
SLOW_GRID = ["--attacks", "badnets", "--defenses", "finetune", "--profile", "quick", "--no-progress",
             "--set", "profile.train_limit=3000", "--set", "profile.test_limit=200", "--set", "profile.epochs=50"]


def _start_and_wait_for_cell(tmp_path, fresh_store, extra=()):
    fresh_store(tmp_path)
    log = open(tmp_path / "stderr.txt", "w")
    # SIGINT at its default, as in a terminal: a suite started in the background (`nohup ... &`)
    # passes on an ignored SIGINT, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "nadbench.commands.cli", "run", *SLOW_GRID, *extra], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while "cell(s) on" not in (tmp_path / "stderr.txt").read_text():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.5)
    while True:  # the cell's run exists and is RUNNING
        children = _child_runs(tmp_path / "nadbench.db")[1]
        if children and children[0].info.status == "RUNNING":
            break
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    time.sleep(3)  # inside the cell's work
    return proc


@needs_data
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_the_cell_cleanly(tmp_path, fresh_store, sig, code):
    proc = _start_and_wait_for_cell(tmp_path, fresh_store, ["--output", "out.json"])
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, (tmp_path / "stderr.txt").read_text()
    _, children, parents = _child_runs(tmp_path / "nadbench.db")
    assert [r.info.status for r in children + parents] == ["KILLED", "KILLED"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["interrupted"] and out["results"] == []


@needs_data
def test_runs_of_a_killed_process_are_marked_at_the_next_start(tmp_path, fresh_store):
    proc = _start_and_wait_for_cell(tmp_path, fresh_store)
    proc.kill()
    proc.wait(timeout=60)
    _, children, parents = _child_runs(tmp_path / "nadbench.db")
    assert [r.info.status for r in children + parents] == ["RUNNING", "RUNNING"]  # nobody closed them
    tracker = Tracker(f"sqlite:///{tmp_path / 'nadbench.db'}")
    live = tracker.start("a live run of this process")
    marked = tracker.reap()
    assert sorted(marked) == sorted(r.info.run_id for r in children + parents)
    client, children, parents = _child_runs(tmp_path / "nadbench.db")
    assert {r.info.status for r in children + parents if r.info.run_id != live} == {"KILLED"}
    assert client.get_run(live).info.status == "RUNNING"  # a live process's run is never touched
    assert "ended without closing the run" in client.get_run(marked[0]).data.tags["nadbench.end_reason"]
