"""All-to-all targets (y -> (y + 1) mod C) end to end: a grid holds one attack's all-to-one and
all-to-all variants as two table rows, with the paper's numbers beside the all-to-one row only;
`bench attack` writes each triggered image's target to ``targets.csv`` and `bench defend` measures
ASR against those per-image targets without ``--target``."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nadbench.commands import tables as table
from nadbench.commands.cli import main
from nadbench.engine import Runner, expand, profile, run_grid
from nadbench.training.evaluate import attack_success_rate
from nadbench.commands.userfiles import load_image_folder, load_model
from nadbench.engine.registry import get_registry
from nadbench.engine.tracking import Tracker

DATA_ROOT = os.environ.get("NADBENCH_DATA_ROOT")


def _cli(*args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        out = CliRunner().invoke(main, list(args))
    finally:
        os.chdir(old)
    assert out.exit_code == 0, out.output
    return out.stdout


def test_a_grid_holds_both_variants_as_two_rows(toy_registry, tmp_path, fresh_store):
    reg = toy_registry()
    uri = fresh_store(tmp_path)
    tracker = Tracker(uri, "nadbench")
    runner = Runner(reg, profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                    device=torch.device("cpu"), progress=False, cache_dir=tmp_path / "cache", tracker=tracker,
                    overrides={"finetune": {"epochs": "1"}, "attack.badnets@all2all": {"poison_rate": "0.3"}})
    cells = expand(reg, ["toy"], ["badnets", "badnets@all2all"], ["finetune"], ["wrn-16-1"], None, [0])
    results, failures = run_grid(runner, cells, name="variants")
    assert not failures and [r["cell"]["attack"] for r in results] == ["badnets", "badnets@all2all"]
    # the variant is its own poisoning and model, and its run records what it was
    assert results[0]["cell_key"] != results[1]["cell_key"]
    runs = {r.data.params["attack.name"]: r.data.params for r in tracker.client.search_runs(
        [tracker.client.get_experiment_by_name("nadbench").experiment_id]) if "attack.name" in r.data.params}
    assert runs["badnets"]["attack.target_mode"] == "all2one"
    assert (runs["badnets@all2all"]["attack.target_mode"], runs["badnets@all2all"]["attack.poison_rate"]) == ("all2all", "0.3")
    data = json.loads(_cli("table", "--tracking-uri", uri, "--format", "json", cwd=tmp_path))
    assert [(row["dataset"], row["attack"]) for row in data["rows"]] == [("toy", "badnets"), ("toy", "badnets@all2all")]


def test_the_papers_numbers_stand_beside_the_all_to_one_row_only():
    def result(attack):
        cell = {"dataset": "cifar10", "attack": attack, "defense": "nad", "student": "wrn-16-1",
                "teacher": "wrn-16-1", "seed": 0, "teacher_source": "supplied", "clean_share": None}
        return {"cell": cell, "before": {"asr": 1.0, "acc": 0.8}, "after": {"asr": 0.1, "acc": 0.78}}

    t = table.build([result("badnets"), result("badnets@all2all")], paper=True)
    rows = list(t.rows)
    assert [r[1] for r in rows] == ["badnets", "badnets@all2all"]
    assert table._paper(t, rows[0], "nad") == table.PAPER["badnets"]["nad"]
    assert table._paper(t, rows[1], "nad") is None


@pytest.mark.slow
@pytest.mark.skipif(not DATA_ROOT or not Path(DATA_ROOT).is_dir(), reason="NADBENCH_DATA_ROOT is not set")
def test_bench_attack_writes_per_image_targets_that_bench_defend_reads(tmp_path, fresh_store):
    fresh_store(tmp_path)
    # The variant's own epochs (20 in the quick profile) would buy nothing: this test reads the files
    # and the per-image ASR, not whether the backdoor took hold.
    out = _cli("attack", "--attack", "badnets@all2all", "--set", "profile.train_limit=1000",
               "--set", "profile.test_limit=200", "--set", "profile.epochs=2", "--set", "profile.crop=0",
               "--set", "badnets@all2all.poison_rate=0.3", "--set", "badnets@all2all.epochs=2", "--output", "model.safetensors",
               "--triggered-output", "triggered", "--no-progress", cwd=tmp_path)
    assert "(target all2all)" in out and "--target" not in out.split("next:")[1], out
    with open(tmp_path / "triggered" / "targets.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(int(r["target"]) == (int(r["file"].split("/")[0]) + 1) % 10 for r in rows), rows[:3]
    assert len(rows) == 200  # every test image: none has its own label as its target

    defended = _cli("defend", "model.safetensors", "--model", "wrn-16-1", "--clean", "cifar10:0.01",
                    "--test", "cifar10:0.02", "--triggered", "triggered", "--defense", "finetune",
                    "--set", "finetune.epochs=1", "--output", "repaired.safetensors", "--no-progress", cwd=tmp_path)
    assert "ASR" in defended, defended
    report = json.loads((tmp_path / "repaired.report.json").read_text())
    # ASR before, as `bench defend` measured it, is the per-image one measured from the files
    model = load_model(tmp_path / "model.safetensors", get_registry().model("wrn-16-1"), 10).eval()
    triggered, _, _, targets = load_image_folder(tmp_path / "triggered", targets=True)
    assert torch.equal(targets, (triggered.labels + 1) % 10)
    assert report["before"]["asr"] == pytest.approx(attack_success_rate(model, triggered, targets))


def test_a_variant_starts_from_its_own_defaults_under_the_users_set():
    """``badnets@all2all`` starts from 40 % poisoning (``variant_defaults``), the all-to-one row keeps
    10 %, and ``--set`` (to the variant or the plain name) wins; a bad declaration is refused."""
    from dataclasses import dataclass

    from nadbench import TARGET_MODES, Attack, param
    from nadbench.contract.config import ConfigError
    from nadbench.engine.grid import profile
    from nadbench.engine.plan import configured
    from nadbench.engine.registry import PluginError, check_contract

    reg = get_registry()
    assert configured(reg, "attacks", "badnets").config.poison_rate == 0.1
    assert configured(reg, "attacks", "badnets@all2all").config.poison_rate == 0.4
    for addressed in ("attack.badnets@all2all", "attack.badnets"):
        assert configured(reg, "attacks", "badnets@all2all",
                          {addressed: {"poison_rate": "0.2"}}).config.poison_rate == 0.2
    res = CliRunner().invoke(main, ["list", "attacks"])
    assert "badnets@all2all starts from: poison_rate=0.4, epochs=20 on quick" in res.output
    # Its longer schedule is the quick profile's only: paper keeps its 100 epochs (None: the profile's),
    # and the engine's Optim takes the attack's epochs, step milestones scaled alike.
    assert configured(reg, "attacks", "badnets@all2all", prof=profile("quick")).config.epochs == 20
    assert configured(reg, "attacks", "badnets@all2all", prof=profile("paper")).config.epochs is None
    assert configured(reg, "attacks", "badnets", prof=profile("quick")).config.epochs is None
    assert profile("quick").backdoor_optim(20).epochs == 20
    assert profile("paper").backdoor_optim(200).milestones == (100, 150)
    assert profile("paper").backdoor_optim().milestones == (50, 75)
    with pytest.raises(ConfigError, match="whole number"):
        configured(reg, "attacks", "badnets", {"badnets": {"epochs": "2.5"}})

    @dataclass(frozen=True)
    class Cfg:
        target: int = param(0, "target")
        target_mode: str = param("all2one", "mode", choices=TARGET_MODES)
        poison_rate: float = param(0.1, "rate")

    for bad in ({"all2one": {"poison_rate": 0.2}}, {"all2all": {"rate": 0.2}},
                {"all2all": {"poison_rate": {"quik": 0.2}}}):
        cls = type("Bad", (Attack,), {"name": "bad", "Config": Cfg, "variant_defaults": bad,
                                      "apply_trigger": lambda self, x: x})
        with pytest.raises(PluginError, match="variant_defaults"):
            check_contract("attacks", cls)


def test_the_engine_trains_a_backdoored_model_for_its_attacks_epochs(toy_registry, tmp_path, monkeypatch):
    """An attack's ``epochs`` (here set with ``--set``) replaces the profile's for the models it
    backdoors, and keys them; the clean model keeps the profile's."""
    import nadbench.engine.stages.train as train_stage
    from nadbench.engine import Cell

    seen = []
    real = train_stage.train
    monkeypatch.setattr(train_stage, "train", lambda model, data, opt, **kw: seen.append(opt.epochs) or real(model, data, opt, **kw))

    def runner(epochs):
        return Runner(toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                      device=torch.device("cpu"), progress=False, cache_dir=tmp_path / "cache",
                      overrides={"badnets": {"epochs": epochs}})

    cell = Cell("toy", "badnets@all2all", "finetune", "wrn-16-1", "wrn-16-1", 0)
    runner("2").backdoored(cell)
    runner("none").clean_model(cell)
    assert seen == [2, 1]
    assert runner("2").plan(cell).student != runner("3").plan(cell).student
