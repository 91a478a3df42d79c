"""The plugin author's path: a mistake in a plugin is a one-line error naming the plugin, the rule and
the fix at the moment it can first be seen (registration, the check before anything trains, the
first step), not a torch error after training; and what authors override works as the README says
(a source-specific attack's targets, check and own evaluation, tests/packages/nadbench-tact; pruned
neurons held at zero)."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, toy_split

from nadbench import Attack, ConfigError, hookimpl, param
from nadbench.toolkit.channels import prune_bn
from nadbench.engine import Cell, Runner, check_grid, expand, profile
from nadbench.training.evaluate import predict
from nadbench.engine.plan import NO_DEFENSE
from nadbench.engine.registry import PluginError, PluginInfo, Registry
from nadbench.training.train import Optim, Step, train

ROOT = Path(__file__).resolve().parents[1]
TACT = ROOT / "tests" / "packages" / "nadbench-tact"
CPU = torch.device("cpu")




def _add(reg: Registry, name: str, **hooks) -> PluginInfo:
    """Register a plugin module holding ``hooks`` as a third party would; its PluginInfo."""
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    info = PluginInfo(name, name, f"{name}-dist 0.1")
    reg.add_plugin(module, info)
    return info


def _with_tact(reg: Registry) -> Registry:
    """``reg`` with tests/packages/nadbench-tact registered, imported from its file (its folder is not put
    on sys.path: a pip build leaves its metadata there, which would register it a second time)."""
    if "nadbench_tact" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nadbench_tact", TACT / "nadbench_tact" / "__init__.py")
        sys.modules["nadbench_tact"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["nadbench_tact"])
    info = PluginInfo("tact", "nadbench_tact", "nadbench-tact 0.1.0")
    reg.add_plugin(sys.modules["nadbench_tact"], info)
    assert info.error is None, info.traceback
    return reg


# ------------------------------------------------------------------------------ a step's loss

class PerSampleLoss(Step):
    """A loss an author forgot to reduce."""

    calls = 0

    def loss(self, model, x, y):
        self.calls += 1
        return F.cross_entropy(model(x), y, reduction="none")


def test_a_per_sample_loss_is_refused_at_the_first_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    weights = copy.deepcopy(model.state_dict())
    step = PerSampleLoss()
    with pytest.raises(PluginError) as err:
        train(model, toy_split(64, 0), Optim(epochs=2, batch_size=16), seed=0, step=step, progress=False)
    assert str(err.value) == ("test_plugin_author.PerSampleLoss.loss() returned a loss of shape (16,): a training "
                              "step's loss must be one number for the batch: reduce per-sample losses, e.g. with "
                              ".mean()")
    assert step.calls == 1  # the first step, before any backward pass or optimiser step
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ what an attack learnt

@dataclass(frozen=True)
class _LearntConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share poisoned", min=0.0, max=1.0)


class _Counting(Step):
    updates = 0

    def update(self, model, x, y, optimizer):
        self.updates += 1
        return super().update(model, x, y, optimizer)


class _ModuleState(Attack):
    """Learns its trigger, and returns a module and a float as what it learnt."""

    name = "module-state"
    Config = _LearntConfig
    learns_trigger = True

    def poison_images(self, images, labels):
        return images.clone()

    def train_step(self, poisoned, n_train):
        self.step = _Counting()
        return self.step

    def learned_state(self):
        return {"net": nn.Conv2d(3, 3, 1), "scale": 0.5}

    def load_learned_state(self, state):
        pass

    def apply_trigger(self, images):
        return images


def test_learned_state_is_checked_after_the_first_optimiser_step(toy_registry, tmp_path):
    reg = toy_registry(models=[TINY])
    assert _add(reg, "modulestate", register_attacks=lambda register: register(_ModuleState)).error is None
    runner = Runner(reg, profile("quick", {"epochs": "2", "batch_size": "16"}), device=CPU,
                    cache_dir=tmp_path, progress=False)
    cell = Cell("toy", "module-state", NO_DEFENSE, "tiny", "tiny", 0)
    with pytest.raises(PluginError) as err:
        runner.backdoored(cell)
    assert str(err.value) == (
        "attack 'module-state' (modulestate-dist 0.1) breaks the plugin contract: learned_state() must return "
        "dict[str, Tensor] (stored with the model), and after the first optimiser step it returned "
        "{'net': Conv2d, 'scale': float}: return tensors, e.g. a module's state_dict() items or torch.tensor(number)")
    assert runner.poisoning(cell).attack.step.updates == 1  # of 8 steps: 64 images in 16s, 2 epochs


class _Forgot(_ModuleState):
    name = "forgot-flag"
    learns_trigger = False


def test_learned_state_without_learns_trigger_is_refused_at_registration():
    reg = Registry()
    info = _add(reg, "forgot", register_attacks=lambda register: register(_Forgot))
    assert info.error == (
        "PluginError: attack 'forgot-flag' overrides learned_state() and load_learned_state() but does not set "
        "learns_trigger = True, without which the engine neither stores nor restores what it learnt: set "
        "learns_trigger = True on the class")
    assert "forgot-flag" not in reg.names("attacks")


# ------------------------------------------------------------------------------ Attack.check

def test_an_attack_refuses_a_config_for_a_dataset_in_check_grid(toy_registry):
    reg = _with_tact(toy_registry(models=[TINY]))
    cells = expand(reg, ["toy"], ["tact"], ["finetune"], ["tiny"], None, [0])
    with pytest.raises(ConfigError) as err:
        check_grid(reg, cells, {"tact": {"sources": "3,12"}}, profile("quick"))
    assert str(err.value) == ("tact.sources = 3,12 names a class that dataset 'toy' lacks: it has 10 classes, so "
                              "sources must be in 0..9")
    check_grid(reg, cells, {"tact": {"sources": "3,9"}}, profile("quick"))


def test_bench_attack_refuses_it_before_anything_trains(tmp_path):
    """As a user installs the package (pip), then `bench attack` with a source class CIFAR-10 lacks."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                          str(site), str(TACT)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NADBENCH_CACHE": str(tmp_path / "empty-cache")}
    # a small profile: a `bench attack` that did not refuse the config would train for seconds, not minutes
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", "attack", "--attack", "tact", "--set", "tact.sources=12",
                          "--set", "profile.train_limit=100", "--set", "profile.epochs=1", "--output", "m.safetensors"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip() == ("Error: tact.sources = 12 names a class that dataset 'cifar10' lacks: it has 10 "
                                  "classes, so sources must be in 0..9")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "empty-cache").exists()  # nothing loaded


# ------------------------------------------------------------------------------ an attack's own evaluation

class _Recorder:
    """A tracker that keeps the metrics a cell logs and ignores the rest."""

    def __init__(self):
        self.logged: dict[str, float] = {}

    def start(self, *args, **kwargs):
        return "run"

    def metrics(self, run_id, values, step=None):
        self.logged.update(values)

    def figure(self, run_id, figure, path):
        import matplotlib.pyplot as plt

        plt.close(figure)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def tact_cell(tmp_path_factory, toy_registry):
    """A TaCT cell on the toy data (sources 1 and 2, target 0), backdoored and finetuned one epoch each."""
    reg = _with_tact(toy_registry(models=[TINY]))
    tracker = _Recorder()
    runner = Runner(reg, profile("quick", {"epochs": "1"}), device=CPU, progress=False, tracker=tracker,
                    cache_dir=tmp_path_factory.mktemp("cache"),
                    overrides={"tact": {"sources": "1,2", "poison_rate": "0.5"}, "finetune": {"epochs": "1"}})
    cell = Cell("toy", "tact", "finetune", "tiny", "tiny", 0, "", None)
    return reg, runner, cell, runner.run_cell(cell), tracker.logged


def test_an_attacks_own_evaluation_is_measured_like_asr_logged_and_tabled(tact_cell):
    from nadbench.commands import tables as table

    reg, runner, cell, result, logged = tact_cell
    p, model = runner.armed(cell), runner.backdoored(cell).model
    test = runner.data("toy")[2]
    assert sorted(set(p.triggered.labels.tolist())) == [1, 2]  # targets(): ASR counts the source classes only
    other = ~torch.isin(test.labels, torch.tensor([0, 1, 2]))  # the cover side: neither source nor target
    preds = predict(model, p.attack.apply_trigger(test.images[other]))
    assert result["before"]["attack.cover"] == float((preds == 0).float().mean())
    assert "attack.cover" in result["after"]
    for phase in ("before", "after"):
        assert logged[f"{phase}.attack.cover"] == result[phase]["attack.cover"]
    text = table.render(table.build([result], metrics=("asr", "attack.cover")))
    assert text.startswith("ASR / attack.cover in %")
    assert f"{100 * result['before']['asr']:.2f} / {100 * result['before']['attack.cover']:.2f}" in text


def test_bench_attack_writes_the_evaluation_and_bench_defend_reports_it(tact_cell, tmp_path, fresh_store,
                                                                        monkeypatch):
    from click.testing import CliRunner

    from nadbench.commands.cli import main
    from nadbench.commands.userfiles import save_image_folder
    from nadbench.commands.practitioner import attack_to_files

    reg, runner, cell, result, _ = tact_cell
    monkeypatch.setattr("nadbench.engine.registry._REGISTRY", reg)  # `bench` with the toy data, the tiny model, TaCT
    files = attack_to_files(reg, runner, attack="tact", arch="tiny", dataset="toy", seed=0,
                            out=tmp_path / "model.safetensors", triggered_dir=tmp_path / "triggered")
    assert files["cache_hit"] and files["evaluations"] == {"cover": tmp_path / "triggered-cover"}
    assert (tmp_path / "triggered-cover" / "targets.csv").exists()
    save_image_folder(toy_split(64, 0), tmp_path / "clean")
    save_image_folder(runner.data("toy")[2], tmp_path / "test")
    out = CliRunner().invoke(main, [
        "defend", str(tmp_path / "model.safetensors"), "--model", "tiny", "--clean", str(tmp_path / "clean"),
        "--test", str(tmp_path / "test"), "--triggered", str(tmp_path / "triggered"), "--evaluation",
        f"cover={tmp_path / 'triggered-cover'}", "--defense", "finetune", "--set", "finetune.epochs=1",
        "--output", str(tmp_path / "repaired.safetensors"), "--tracking-uri", fresh_store(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "repaired.report.json").read_text())
    assert report["before"]["attack.cover"] == result["before"]["attack.cover"]  # the files mean what the cell meant
    assert f"attack.cover {100 * report['before']['attack.cover']:>7.2f}%" in out.stdout


# ------------------------------------------------------------------------------ pruned neurons held

def test_pruned_neurons_held_stay_at_zero_through_later_training():
    torch.manual_seed(0)
    # no ReLU after the BN: a pruned neuron's output, 0, would give its weights no gradient to regrow by
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    keys = set(model.state_dict())
    loose = prune_bn(copy.deepcopy(model), {"1": [0, 3]})
    held = prune_bn(model, {"1": [0, 3]}, hold=True)
    copied = copy.deepcopy(held)
    for m in (loose, held, copied):
        train(m, toy_split(64, 0), Optim(epochs=1, batch_size=16), seed=0, progress=False)
    assert loose[1].weight[[0, 3]].abs().min() > 0  # without hold they regrow
    for m in (held, copied):
        assert not m[1].weight[[0, 3]].any() and not m[1].bias[[0, 3]].any()
        assert m[1].weight.count_nonzero() == 6
    assert set(held.state_dict()) == keys  # the state dict is unchanged
