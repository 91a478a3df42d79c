"""The `bench` command. Torch and the plugins load only when a command needs them, so `--help`
stays fast."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

KIND_OF_OPTION = {"datasets": "datasets", "attacks": "attacks", "defenses": "defenses", "models": "models"}


def _registry():
    from .registry import get_registry

    return get_registry()


class NameList(click.ParamType):
    """Comma-separated registry names (``all`` expands); checked against the registry."""

    name = "names"

    def __init__(self, kind: str):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        valid = _registry().names(self.kind)
        names = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if part == "all":
                names.extend(n for n in valid if n not in names)
            elif part not in valid:
                self.fail(f"unknown {self.kind[:-1]} {part!r}; valid {self.kind}: {', '.join(valid) or '(none)'}"
                          + (", all" if self.kind in ("attacks", "defenses") else ""), param, ctx)
            elif part not in names:
                names.append(part)
        if not names:
            self.fail(f"no {self.kind} given", param, ctx)
        return names

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        head, _, tail = incomplete.rpartition(",")
        prefix = head + "," if head else ""
        return [CompletionItem(prefix + n) for n in _registry().names(self.kind) + ["all"] if n.startswith(tail)]


class IntList(click.ParamType):
    name = "ints"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def _parse_sets(sets: tuple[str, ...], registry) -> tuple[dict, dict]:
    """``--set nad.epochs=5 --set profile.epochs=2`` -> (profile overrides, per-plugin overrides)."""
    prof, plugins = {}, {}
    known = set(registry.names("attacks")) | set(registry.names("defenses"))
    for item in sets:
        key, eq, value = item.partition("=")
        owner, dot, field = key.strip().partition(".")
        if not eq or not dot or not field:
            raise click.BadParameter(f"{item!r}: expected OWNER.FIELD=VALUE, e.g. nad.epochs=5", param_hint="--set")
        if owner == "profile":
            prof[field] = value
        elif owner in known:
            plugins.setdefault(owner, {})[field] = value
        else:
            raise click.BadParameter(f"{item!r}: {owner!r} is neither 'profile' nor an attack or defense; "
                                     f"valid: profile, {', '.join(sorted(known))}", param_hint="--set")
    return prof, plugins


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nadbench")
def main():
    """nadbench: backdoor attacks and defenses on image classifiers, around Neural Attention
    Distillation (NAD). Results go to MLflow (an SQLite store in the working directory by default)."""


@main.command()
@click.option("--datasets", type=NameList("datasets"), default="cifar10", show_default=True,
              help="Comma-separated datasets.")
@click.option("--attacks", type=NameList("attacks"), default="badnets", show_default=True,
              help="Comma-separated attacks, or 'all'.")
@click.option("--defenses", type=NameList("defenses"), default="nad", show_default=True,
              help="Comma-separated defenses, or 'all'.")
@click.option("--models", "students", type=NameList("models"), default="wrn-16-1", show_default=True,
              help="Student (backdoored) architectures.")
@click.option("--teachers", type=NameList("models"), default=None,
              help="Teacher architectures for defenses that use one (default: the student's).")
@click.option("--seeds", type=IntList(), default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--profile", "profile_name", type=click.Choice(["quick", "paper"]), default="quick",
              show_default=True, help="quick: minutes on a CPU; paper: the paper's settings (GPU).")
@click.option("--set", "sets", multiple=True, metavar="OWNER.FIELD=VALUE",
              help="Override a config field: profile.epochs=2, nad.betas=500,1000,1000, badnets.target=0.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="NADBENCH_DATA_ROOT", show_envvar=True,
              help="Folder with the datasets (ImageFolder folders or .tar.xz archives); without it, "
                   "torchvision downloads them.")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", show_envvar=True,
              help="MLflow store [default: sqlite:///./nadbench.db].")
@click.option("--experiment", default="nadbench", show_default=True, help="MLflow experiment name.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--clean-reference", is_flag=True,
              help="Also train (once, cached) a clean model per dataset/architecture/seed and log its ACC.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
def run(datasets, attacks, defenses, students, teachers, seeds, profile_name, sets, device, data_root,
        tracking_uri, experiment, output, clean_reference, progress):
    """Run the grid datasets x attacks x defenses x models x seeds; log every cell to MLflow.

    \b
    Example:  bench run --attacks all --defenses nad
    """
    import time

    from .config import ConfigError
    from .engine import Runner, expand, plugin_overrides, profile, resolve_device, run_grid
    from .tracking import Tracker

    registry = _registry()
    try:
        prof_over, plugin_over = _parse_sets(sets, registry)
        prof = profile(profile_name, prof_over)
        plugin_over = plugin_overrides(prof, plugin_over)
        for name in attacks:  # validate every config before anything trains
            registry.attack(name).from_overrides(plugin_over.get(name))
        for name in defenses:
            registry.defense(name).from_overrides(plugin_over.get(name))
        dev = resolve_device(device)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    cells = expand(registry, datasets, attacks, defenses, students, teachers, seeds)
    tracker = Tracker(tracking_uri, experiment)
    runner = Runner(registry, prof, device=dev, data_root=data_root, overrides=plugin_over,
                    tracker=tracker, progress=progress, clean_reference=clean_reference)
    click.echo(f"{len(cells)} cell(s) on {dev}, profile {prof.name}; tracking to {tracker.uri}", err=True)
    start = time.perf_counter()
    params = {"grid.datasets": ",".join(datasets), "grid.attacks": ",".join(attacks),
              "grid.defenses": ",".join(defenses), "grid.students": ",".join(students),
              "grid.teachers": ",".join(teachers or students), "grid.seeds": ",".join(map(str, seeds)),
              "profile": prof.name, "device": str(dev), "command": _command()}
    results, failures = run_grid(runner, cells, name=f"bench run ({len(cells)} cells)", params=params)
    wall = time.perf_counter() - start
    click.echo(_table(results))
    click.echo(f"wall time {wall:.0f} s; {len(results)} cell(s) finished, {len(failures)} failed. "
               f"Browse: bench ui", err=True)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"command": _command(), "wall_s": wall, "device": str(dev),
                                      "profile": prof.name, "results": results,
                                      "failures": [[c.label, e] for c, e in failures]}, indent=2))
    if failures:
        for cell, err in failures:
            click.echo(f"FAILED {cell.label}: {err}", err=True)
        sys.exit(1)


def _command() -> str:
    """The command line as a user would type it (``bench run ...``), for results files."""
    import shlex

    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _table(results: list[dict]) -> str:
    rows = [("cell", "clean ACC", "ACC before", "ASR before", "ACC after", "ASR after", "defense s")]
    for r in results:
        c = r["cell"]
        arch = c["student"] if c["student"] == c["teacher"] else f"{c['student']}<-{c['teacher']}"
        clean = f"{100 * r['clean_model']['acc']:.2f}" if r.get("clean_model") else "-"
        rows.append((f"{c['dataset']}/{c['attack']}/{c['defense']}/{arch}/seed{c['seed']}", clean,
                     f"{100 * r['before']['acc']:.2f}", f"{100 * r['before']['asr']:.2f}",
                     f"{100 * r['after']['acc']:.2f}", f"{100 * r['after']['asr']:.2f}",
                     f"{r['time_defense_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in rows)


@main.command("list")
@click.argument("kind", required=False, type=click.Choice(["datasets", "models", "attacks", "defenses"]))
def list_(kind):
    """List the registered datasets, models, attacks and defenses, with providers and configs."""
    from .config import describe

    registry = _registry()
    for k in [kind] if kind else ["datasets", "models", "attacks", "defenses"]:
        click.secho(k, bold=True)
        for name in registry.names(k):
            item = registry.get(k, name)
            click.echo(f"  {name:<28} {item.description}  [{item.provider}]")
            if k == "models" and item.attention_layers:
                click.echo(f"      attention layers: {', '.join(item.attention_layers)}")
            if k == "datasets":
                click.echo(f"      {item.num_classes} classes, {item.image_size}x{item.image_size}")
            if k in ("attacks", "defenses"):
                for field, default, help_ in describe(item.Config):
                    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                    click.echo(f"      {name}.{field}={shown}  {help_}")


@main.command()
@click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks of plugins that failed.")
def plugins(verbose):
    """Installed plugins (entry points of the `nadbench` group) and those that failed to load."""
    registry = _registry()
    for info in registry.plugins:
        if info.error:
            continue
        click.echo(f"{info.name:<16} {info.distribution or '-':<22} {info.value}  hooks: {', '.join(info.hooks)}")
    failed = registry.failed
    if failed:
        click.secho(f"\n{len(failed)} plugin(s) failed to load and were skipped:", fg="red", err=True)
        for info in failed:
            click.echo(f"{info.name:<16} {info.distribution or '-':<22} {info.value}  {info.error}", err=True)
            if verbose and info.traceback:
                click.echo(info.traceback, err=True)


@main.command()
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", show_envvar=True,
              help="MLflow store [default: sqlite:///./nadbench.db].")
@click.option("--experiment", default="nadbench", show_default=True)
@click.option("--port", default=5000, show_default=True)
def ui(tracking_uri, experiment, port):
    """Open the MLflow UI on the results store, bound to localhost."""
    from .tracking import Tracker, artifact_root

    tracker = Tracker(tracking_uri, experiment)
    mlflow = shutil.which("mlflow") or f"{sys.executable} -m mlflow"
    cmd = mlflow.split() + ["ui", "--backend-store-uri", tracker.uri, "--default-artifact-root",
                            artifact_root(tracker.uri), "--host", "127.0.0.1", "--port", str(port)]
    click.echo(f"Runs table: {tracker.ui_link('127.0.0.1', port)}")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
