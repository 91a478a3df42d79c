"""CLI behaviour that needs no training: name checking, --set parsing, listings, fast --help."""
import subprocess
import sys

from click.testing import CliRunner

from nadbench.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_unknown_names_list_the_valid_ones():
    res = _run("run", "--attacks", "badnets,nope")
    assert res.exit_code == 2
    assert "unknown attack 'nope'; valid attacks: " in res.output and "badnets" in res.output
    res = _run("run", "--models", "wrn-99-1")
    assert "unknown model 'wrn-99-1'" in res.output and "wrn-16-1" in res.output


def test_bad_set_values_are_usage_errors():
    res = _run("run", "--set", "nad.attention=max")
    assert res.exit_code == 2 and "nad.attention = 'max' is invalid: must be one of mean_p, sum_p, sum" in res.output
    res = _run("run", "--set", "foo.bar=1")
    assert res.exit_code == 2 and "neither 'profile' nor an attack or defense" in res.output
    res = _run("run", "--set", "profile.epochs=0")
    assert res.exit_code == 2 and "profile.epochs = 0 is out of range" in res.output
    res = _run("run", "--profile", "slow")
    assert res.exit_code == 2 and "'quick', 'paper'" in res.output


def test_list_shows_configs_and_providers():
    res = _run("list")
    assert res.exit_code == 0
    assert "nad.betas=500.0,1000.0,1000.0" in res.output and "badnets.poison_rate=0.1" in res.output
    assert "[nadbench " in res.output and "attention layers: block1, block2, block3" in res.output


def test_help_does_not_import_torch():
    code = "import sys; from nadbench.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"
