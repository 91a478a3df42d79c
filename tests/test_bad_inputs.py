"""Bad input found by trying the CLI as a new user would: each is refused in one usage error (exit 2)
before anything trains or reads the tracking store."""
import click
import pytest
from click.testing import CliRunner

from nadbench.commands.cli import IntList, main
from nadbench.contract.config import ConfigError
from nadbench.engine.registry import get_registry


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_a_seed_given_twice_is_refused(tmp_path):
    with pytest.raises(click.BadParameter, match="0 given more than once"):
        IntList().convert("0,1,0", None, None)
    res = _run("run", "--seeds", "0,1,0", "--data-root", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/t.db")
    assert res.exit_code == 2 and "0 given more than once" in res.output, res.output
    assert not (tmp_path / "t.db").exists()


def test_a_config_path_that_does_not_exist_is_refused_with_the_other_config_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"refool\.reflection_folder = '/nonexistent' is invalid: no such folder"):
        get_registry().attack("refool").from_overrides({"reflection_folder": "/nonexistent"})
    with pytest.raises(ConfigError, match=r"blend\.key_image = .* is invalid: no such file"):
        get_registry().attack("blend").from_overrides({"key_image": str(tmp_path)})  # a folder, not a file
    res = _run("run", "--attacks", "refool", "--datasets", "gtsrb", "--set", "refool.reflection_folder=/nonexistent",
               "--data-root", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/t.db")
    assert res.exit_code == 2 and "no such folder" in res.output, res.output
    assert not (tmp_path / "t.db").exists()


def test_an_unknown_table_metric_is_named_before_the_store_is_read(tmp_path):
    res = _run("table", "--metrics", "asr,bogus", "--tracking-uri", f"sqlite:///{tmp_path}/none.db")
    assert res.exit_code == 2 and "unknown metric(s) bogus; valid: asr, acc" in res.output, res.output
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("command", ["attack", "defend"])
def test_a_model_file_named_as_a_pickle_is_refused_before_training(tmp_path, command):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    res = _run(command, *([str(model), "--model", "wrn-16-1"] if command == "defend" else []),
               "--output", str(tmp_path / "x.pt"), "--data-root", str(tmp_path))
    assert res.exit_code == 2 and "name it x.safetensors" in res.output, res.output
    assert not (tmp_path / "x.pt").exists()
