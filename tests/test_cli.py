"""CLI behaviour that needs no training: name checking, --set parsing, listings, fast --help."""
import subprocess
import sys

import torch
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
    res = _run("run", "--attacks", "ssba")  # a built-in name given up says where it went
    assert res.exit_code == 2 and "unknown attack 'ssba'; 'ssba' is now stegastamp: " in res.output


def test_bad_set_values_are_usage_errors():
    res = _run("run", "--set", "nad.attention=max")
    assert res.exit_code == 2 and "nad.attention = 'max' is invalid: must be one of mean_p, sum_p, sum" in res.output
    res = _run("run", "--set", "foo.bar=1")
    assert res.exit_code == 2 and "neither 'profile' nor an attack, defense or detector" in res.output
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


def _commands(group=None, path=("bench",)):
    """Every command of `bench`, subcommands of groups included, with its path."""
    import click

    group = group or main
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_of_every_command_says_what_it_does():
    import click

    bare = [f"{path} {'/'.join(p.opts)}" for path, command in _commands() for p in command.params
            if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert bare == []
    assert len(list(_commands())) >= 10


def test_bench_run_help_groups_its_options():
    from nadbench.commands.cli import RUN_SECTIONS, run

    out = _run("run", "--help").output
    titles = [line.rstrip(":") for line in out.splitlines() if line and not line.startswith(" ")
              and line.endswith(":")]
    assert titles[-5:] == ["The grid", "Training", "Execution", "Tracking and output", "Other options"], titles
    placed = {name for names in RUN_SECTIONS.values() for name in names}
    assert {p.name for p in run.params} | {"help"} == placed  # every option in a named group, none forgotten
    assert out.index("--seeds") < out.index("Training:") < out.index("--precision") < out.index("Execution:")


def test_bad_input_is_one_line_and_exit_2_and_a_failure_while_running_exit_1(tmp_path):
    """The click errors (a bad choice, a missing argument) end as the commands' own do: one line."""
    for args in (["run", "--profile", "slow"], ["defend"], ["run", "--seeds", "x"], ["table", "--format", "xml"],
                 ["list", "nonesuch"], ["attack", "--attack", "nonesuch", "--data-root", str(tmp_path)]):
        res = CliRunner().invoke(main, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (args, res.stderr)
    res = CliRunner().invoke(main, ["table", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db"])
    ours = [line for line in res.stderr.splitlines() if "mlflow" not in line]  # MLflow logs creating the store
    assert res.exit_code == 1 and ours == [f"Error: no `bench run` grid in experiment 'nadbench' of "
                                           f"sqlite:///{tmp_path}/empty.db"], res.stderr


def test_the_old_spellings_still_work_with_a_warning(tmp_path):
    """`--arch`, `--out`, `--teacher-arch` (and `--triggered-out`) as scripts wrote them: read as
    `--model`, `--output`, `--teacher-model`, each with a deprecation warning."""
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, model)
    res = CliRunner().invoke(main, ["defend", str(model), "--arch", "wrn-16-1", "--teacher-arch", "wrn-99-1",
                                    "--out=x.pt", "--clean", "cifar10:0.01"])
    assert "--arch is deprecated: use --model" in res.stderr and "--out is deprecated: use --output" in res.stderr
    assert res.exit_code == 2 and "name it x.safetensors" in res.stderr  # --out=x.pt reached --output's check
    res = CliRunner().invoke(main, ["defend", str(model), "--arch", "wrn-16-1", "--teacher-arch", "wrn-99-1",
                                    "--clean", "cifar10:0.01"])
    assert "--teacher-arch is deprecated" in res.stderr and "unknown model 'wrn-99-1'" in res.stderr, res.stderr
