"""`bench cache info` / `bench cache clear --unreachable`: stored stages no key of the current code reaches."""
import json

import torch
from click.testing import CliRunner


def _entry(folder, key: str, text: str):
    from nadbench.training.models import save_tensors

    save_tensors({"w": torch.zeros(1)}, folder / f"{key}.safetensors", {"key": text})


def test_entries_of_older_code_are_shown_and_removed_and_current_ones_kept(tmp_path, monkeypatch):
    from nadbench.commands.cli import main
    from nadbench.engine.grid import Cell, profile
    from nadbench.engine.plan import Keys
    from nadbench.engine.registry import get_registry

    monkeypatch.setenv("NADBENCH_CACHE", str(tmp_path))
    keys = Keys(get_registry(), profile("quick"), "cpu", "float32+channels-last", {}, False,
                lambda name: {"train": "digest-train", "test": "digest-test"})
    plan = keys.plan(Cell("cifar10", "badnets", "finetune", "wrn-16-1", "wrn-16-1", 0))
    models, poison = tmp_path / "models", tmp_path / "poison"
    models.mkdir()
    poison.mkdir()
    _entry(models, *plan.student)
    _entry(poison, *plan.poison)
    edited = json.loads(plan.student[1])
    _entry(models, "b" * 24, json.dumps({**edited, "code": "0" * 64}, sort_keys=True))
    _entry(models, "c" * 24, json.dumps({**edited, "core": "4"}, sort_keys=True))  # an older nadbench's
    _entry(poison, "d" * 24, json.dumps({**json.loads(plan.poison[1]), "plugin": ["nadbench 0.0.1", "x"]}))

    info = CliRunner().invoke(main, ["cache", "info"])
    assert info.exit_code == 0, info.output
    assert "2 unreachable" in info.output and "1 unreachable" in info.output
    out = CliRunner().invoke(main, ["cache", "clear", "--unreachable"])
    assert out.exit_code == 0, out.output
    assert "the train stage's code changed" in out.output and "version number" in out.output
    assert "attack 'badnets' is another version" in out.output
    assert sorted(p.stem for p in models.iterdir() if p.suffix == ".safetensors") == [plan.student[0]]
    assert sorted(p.stem for p in poison.iterdir() if p.suffix == ".safetensors") == [plan.poison[0]]
    assert "unreachable" not in CliRunner().invoke(main, ["cache", "info"]).output
