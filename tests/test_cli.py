"""CLI behaviour that needs no training: name checking, --set parsing, listings, fast --help."""
import subprocess
import sys

from click.testing import CliRunner

from nadbench.commands.cli import main


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
    code = "import sys; from nadbench.commands.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_attacks_all_runs_refool_only_where_it_implants():
    """`--attacks all` pairs Refool with GTSRB (``Attack.all_datasets``: ~50 % ASR on CIFAR-10 with
    the quick profile); named, it runs anywhere."""
    from nadbench.commands.cli import NameList
    from nadbench.engine import expand
    from nadbench.engine.registry import get_registry

    reg = get_registry()
    picked = NameList("attacks").convert("badnets,all", None, None)
    assert "refool" in picked and "badnets" not in picked.picked_by_all and "refool" in picked.picked_by_all
    grid = {(c.dataset, c.attack) for c in expand(reg, ["cifar10", "gtsrb"], picked, ["finetune"], ["wrn-16-1"],
                                                  None, [0], picked_by_all=picked.picked_by_all)}
    assert ("gtsrb", "refool") in grid and ("cifar10", "refool") not in grid and ("cifar10", "blend") in grid
    named = NameList("attacks").convert("refool,badnets", None, None)
    grid = {(c.dataset, c.attack) for c in expand(reg, ["cifar10"], named, ["finetune"], ["wrn-16-1"], None, [0],
                                                  picked_by_all=named.picked_by_all)}
    assert grid == {("cifar10", "refool"), ("cifar10", "badnets")}
    res = _run("list", "attacks")
    assert "--attacks all runs it on: gtsrb" in res.output
