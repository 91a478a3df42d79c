"""What every `bench` command shares: its options, the one way it fails, its help's sections, and
the old spellings of renamed options.

Exit codes (the README's): 2 for bad input, one line on stderr, before anything runs; 1 for a
failure while running; 130 on Ctrl-C and 143 on SIGTERM (`bench run` ends its grid first).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

DEFAULT_STORE = "sqlite:///./nadbench.db"


def fail(message: str, *, running: bool = False) -> NoReturn:
    """Stop the command: bad input (exit 2) or, with ``running``, a failure while running (exit 1)."""
    raise (click.ClickException if running else click.UsageError)(message)


class Command(click.Command):
    """A `bench` command. ``renamed`` maps an old option spelling to today's: accepted, with a
    warning, so that scripts keep working. ``sections`` groups the options in ``--help``."""

    def __init__(self, *args, renamed: dict[str, str] | None = None,
                 sections: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = renamed or {}
        self.sections = sections or {}

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, [self._spelled(ctx, arg) for arg in args])

    def _spelled(self, ctx, arg: str) -> str:
        name, eq, value = arg.partition("=")
        if name not in self.renamed:
            return arg
        click.echo(f"warning: {ctx.command_path} {name} is deprecated: use {self.renamed[name]}", err=True)
        return self.renamed[name] + eq + value

    def format_options(self, ctx, formatter):
        if not self.sections:
            return super().format_options(ctx, formatter)
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        placed = {n for names in self.sections.values() for n in names}
        sections = {**self.sections, "Other options": (*self.sections.get("Other options", ()),
                                                       *(n for n in records if n not in placed))}
        for title, names in sections.items():
            rows = [records[n] for n in names if records.get(n)]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Group(click.Group):
    """`bench`: every error of its commands ends as :func:`fail` says (one line, exit 2 or 1)."""

    command_class = Command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def tracking_options(experiment: str = "nadbench", timeout: bool = True):
    """--tracking-uri and --experiment (and --tracking-timeout): where a command's runs are tracked."""
    def decorate(command):
        if timeout:
            command = click.option(
                "--tracking-timeout", type=float, default=5.0, show_default=True, envvar="NADBENCH_TRACKING_TIMEOUT",
                show_envvar=True, help="Seconds for the one reachability check of a tracking server.")(command)
        command = click.option("--experiment", default=experiment, show_default=True,
                               help="MLflow experiment name.")(command)
        return click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", show_envvar=True,
                            help=f"MLflow store [default: {DEFAULT_STORE}].")(command)
    return decorate


def machine_options(command):
    """--device, --data-root and --progress: where a command computes and reads its datasets."""
    command = click.option("--progress/--no-progress", default=True, show_default=True,
                           help="Progress bars.")(command)
    command = click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                           envvar="NADBENCH_DATA_ROOT", show_envvar=True,
                           help="Folder with the registered datasets (ImageFolder folders or .tar.xz archives); "
                                "without it, torchvision downloads them.")(command)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(command)


def computing_options(command):
    """How a command computes (``nadbench.training.settings.RunSettings``): its options read the
    environment as their defaults (``NADBENCH_PRECISION``, ...), once, here; nothing writes them back."""
    command = click.option("--threads", type=click.IntRange(min=1), default=None,
                           help="CPU threads per cell (pin it to compare runs: CPU results shift with it).")(command)
    command = click.option("--compile", "compile_", is_flag=True, envvar="NADBENCH_COMPILE", show_envvar=True,
                           help="torch.compile the model for the plain cross-entropy phases.")(command)
    return click.option("--precision", type=click.Choice(["auto", "float32", "bf16"]), default="auto",
                        show_default=True, envvar="NADBENCH_PRECISION", show_envvar=True,
                        help="auto: bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), else float32 (GPUs "
                             "too: faster there for these small networks).")(command)


def profile_option(help: str):
    return click.option("--profile", "profile_name", type=click.Choice(["quick", "paper"]), default="quick",
                        show_default=True, help=help)


def sets_option(help: str):
    return click.option("--set", "sets", multiple=True, metavar="OWNER.FIELD=VALUE", help=help)


def seed_option(command):
    return click.option("--seed", default=0, show_default=True,
                        help="Seeds the data split, the initialisation and the method.")(command)


def _safetensors_path(ctx, param, path: Path) -> Path:
    """A model file to write: ``.safetensors``, checked before anything trains (a pickle's suffix
    would name a file `bench defend` refuses unopened)."""
    if path.suffix != ".safetensors":
        raise click.BadParameter(f"{path}: a model is written as safetensors: name it {path.stem}.safetensors",
                                 ctx, param)
    return path


def model_output_option(default: str, help: str):
    """--output for a model file (``--out`` before): safetensors, its suffix checked first."""
    return click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path(default),
                        show_default=True, callback=_safetensors_path, help=help)
