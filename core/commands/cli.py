"""The `bench` command. Torch and the plugins load only when a command needs them, so `--help`
stays fast."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

from ..engine import environment
from .options import (Group, computing_options, fail, machine_options, model_output_option, profile_option,
                      seed_option, sets_option, tracking_options)



def run_settings(device: str, precision: str, compile_: bool, threads: int | None, **more):
    from ..training.settings import RunSettings

    return RunSettings(device=device, precision=precision, compile=compile_, threads=threads, **more)


def _registry():
    from ..engine.registry import get_registry

    return get_registry()


class Names(list):
    """The names a :class:`NameList` gave, with those that came from ``all`` (``picked_by_all``)."""

    picked_by_all: tuple[str, ...] = ()


class NameList(click.ParamType):
    """Comma-separated registry names (``all`` expands); checked against the registry."""

    name = "names"

    def __init__(self, kind: str):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from ..engine.registry import PluginError

        registry = _registry()
        valid = registry.names(self.kind)
        names, named = Names(), set()
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if part == "all":
                names.extend(n for n in valid if n not in names)
                continue
            named.add(part)
            try:
                registry.get(self.kind, part)  # plain or dist:name; ambiguous names are errors
            except PluginError as exc:
                message = str(exc)
                if self.kind in ("attacks", "defenses", "detectors") and message.startswith("unknown"):
                    message = message.replace(f"valid {self.kind}: {', '.join(valid)}",
                                              f"valid {self.kind}: {', '.join(valid)}, all")
                self.fail(message, param, ctx)
            part = registry.canonical(self.kind, part)  # NAME@v1@v2 in any order: one spelling
            if part not in names:
                names.append(part)
        if not names:
            self.fail(f"no {self.kind} given", param, ctx)
        names.picked_by_all = tuple(n for n in names if n not in named)
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
            values = [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not values:
            self.fail("no values given (e.g. 0,1,2)", param, ctx)
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            self.fail(f"{', '.join(map(str, repeated))} given more than once (each value is one run of the grid)",
                      param, ctx)
        return values


class ShareList(click.ParamType):
    """Comma-separated shares in (0, 1], e.g. 0.01,0.05,0.1."""

    name = "shares"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            values = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 0.01,0.05,0.1)", param, ctx)
        bad = [v for v in values if not 0 < v <= 1]
        if bad or not values:
            self.fail(f"every share must be in (0, 1] (e.g. 0.01,0.05,0.1); got {value!r}", param, ctx)
        return list(dict.fromkeys(values))


def _parse_sets(sets: tuple[str, ...], registry, grid: dict[str, list[str]]) -> tuple[dict, dict]:
    """``--set nad.epochs=5 --set profile.epochs=2`` -> (profile overrides, per-plugin overrides
    keyed ``attack.NAME`` / ``defense.NAME``, as the engine takes them).

    An owner must be ``profile`` or an attack or defense of this grid (by its name, which a
    ``dist:name`` choice keeps): a --set that would be silently ignored is an error. A name that is
    both an attack and a defense of the grid takes its kind first: ``attack.NAME.FIELD=VALUE``."""
    from ..engine.plan import KIND_PREFIX
    from ..engine.registry import addressing, spelling

    prof, plugins = {}, {}
    # By plugin name, and a variant (NAME@bb@all2all) also by each spelling its --set reaches it by.
    in_grid = {kind: {registry.get(kind, n).name for n in grid.get(kind, [])}
               | {a for n in grid.get(kind, []) if "@" in n
                  for a in addressing(registry.get(kind, n).name, n.split("@")[1:])}
               for kind in KIND_PREFIX}
    valid = sorted(set().union(*in_grid.values()))
    for item in sets:
        key, eq, value = item.partition("=")
        owner, dot, field = key.strip().partition(".")
        kinds = [k for k, prefix in KIND_PREFIX.items() if owner == prefix]
        if kinds and "." in field:  # attack.NAME.FIELD
            owner, _, field = field.partition(".")
        if "@" in owner:  # a variant's spelling, in any order: its canonical one
            base, *variants = owner.split("@")
            owner = spelling(base, variants)
        if not kinds:
            kinds = [k for k in in_grid if owner in in_grid[k]]
        if not eq or not dot or not field:
            raise click.BadParameter(f"{item!r}: expected OWNER.FIELD=VALUE, e.g. nad.epochs=5", param_hint="--set")
        if owner == "profile" and not kinds:
            prof[field] = value
        elif len(kinds) == 1 and owner in in_grid[kinds[0]]:
            plugins.setdefault(f"{KIND_PREFIX[kinds[0]]}.{owner}", {})[field] = value
        elif len(kinds) >= 2:
            spelled = " or ".join(f"{KIND_PREFIX[k]}.{owner}.{field}={value}" for k in kinds)
            kinds_of = " and ".join({"attacks": "an attack", "defenses": "a defense", "detectors": "a detector"}[k]
                                    for k in kinds)
            raise click.BadParameter(f"{item!r}: {owner!r} is both {kinds_of} of this grid; write {spelled}",
                                     param_hint="--set")
        else:
            known = set().union(*(registry.names(k) for k in KIND_PREFIX))
            why = ("is not in this grid (add it to --attacks/--defenses/--detectors, or drop the --set)"
                   if owner in known else "is neither 'profile' nor an attack, defense or detector")
            raise click.BadParameter(f"{item!r}: {owner!r} {why}; valid here: profile, "
                                     f"{', '.join(valid)}", param_hint="--set")
    return prof, plugins


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nadbench")
def main():
    """nadbench: backdoor attacks and defenses on image classifiers, around Neural Attention
    Distillation (NAD). Results go to MLflow (an SQLite store in the working directory by default)."""


def _grid(registry, datasets, attacks, defenses, students, teachers, teacher_sources, seeds, clean_shares,
          profile_name, sets, device, detectors=()):
    """`bench run`'s profile, --set overrides, cells and device, every config and pair checked before
    anything trains: a usage error otherwise."""
    from ..contract.config import ConfigError
    from ..engine.runner import check_grid, expand, profile, resolve_device
    from ..engine.registry import PluginError

    try:
        prof_over, plugin_over = _parse_sets(sets, registry, {"attacks": attacks, "defenses": defenses,
                                                              "detectors": detectors})
        prof = profile(profile_name, prof_over)
        dev = resolve_device(device)
        if teachers and not any(registry.defense(d).uses_teacher for d in defenses):
            users = [n for n in registry.names("defenses") if registry.defense(n).uses_teacher]
            raise ConfigError(f"--teachers applies to defenses that use a teacher ({', '.join(users) or 'none'}), "
                              f"and none of {', '.join(defenses)} does: add one to --defenses or drop --teachers")
        picked = getattr(attacks, "picked_by_all", ())
        cells = expand(registry, datasets, attacks, defenses, students, teachers, seeds,
                       tuple(teacher_sources.split(",")), clean_shares, picked, detectors)
        cells = _threat_models(registry, cells, plugin_over, prof, getattr(defenses, "picked_by_all", ()))
        for name in picked:
            only = registry.attack(name).all_datasets
            if only and set(datasets) - set(only):
                click.echo(f"note: --attacks all runs {name} on {', '.join(only)} only (where it implants on "
                           f"the quick profile); name it in --attacks to run it on "
                           f"{', '.join(sorted(set(datasets) - set(only)))}", err=True)
        if not cells:
            raise ConfigError(f"no cells: --attacks all runs none of its attacks on {', '.join(datasets)}")
        check_grid(registry, cells, plugin_over, prof)  # every config and pair, before anything trains
    except (ConfigError, PluginError) as exc:
        fail(str(exc))
    return prof, plugin_over, cells, dev


def _threat_models(registry, cells, overrides, prof, defenses_by_all=()):
    """``cells`` less the pairs an attack that controls training makes with a data detector (its poisoning
    is no stored set of rows to inspect) and with a training-time defense that ``--defenses all`` chose
    (the defender would run the training the attacker runs; one named is refused by ``check_grid``),
    each pair skipped with a note."""
    from ..engine.plan import configured

    kept, skipped, untrained = [], {}, {}
    for cell in cells:
        def controls():
            return configured(registry, "attacks", cell.attack, overrides, prof).controls_training
        if cell.detector and registry.detector(cell.detector).level == "data" and controls():
            skipped.setdefault(cell.attack, set()).add(cell.detector)
        elif not cell.detector and cell.defense in defenses_by_all and registry.defense(cell.defense).trains \
                and controls():
            untrained.setdefault(cell.attack, set()).add(cell.defense)
        else:
            kept.append(cell)
    for attack, detectors in skipped.items():
        click.echo(f"note: skipped {', '.join(sorted(detectors))} on {attack}: {attack} runs the training of its "
                   "model (its poisoning is no set of training rows a data detector could inspect)", err=True)
    for attack, defenses in untrained.items():
        click.echo(f"note: skipped {', '.join(sorted(defenses))} on {attack}: {attack} runs the training of its "
                   "model, and a training-time defense is a defender who runs it", err=True)
    return kept


RUN_SECTIONS = {
    "The grid": ("datasets", "attacks", "defenses", "detectors", "fpr", "students", "teachers", "teacher_sources", "seeds",
                 "clean_shares", "profile_name", "sets", "clean_reference", "reactivation"),
    "Training": ("device", "data_root", "precision", "compile_", "threads", "fused", "fused_max"),
    "Execution": ("executor", "workers", "cells_per_gpu", "ray_address", "rerun", "stale_after", "progress"),
    "Tracking and output": ("tracking_uri", "experiment", "tracking_timeout", "output"),
    "Other options": ("help",),
}


@main.command(sections=RUN_SECTIONS)
@click.option("--datasets", type=NameList("datasets"), default="cifar10", show_default=True,
              help="Comma-separated datasets.")
@click.option("--attacks", type=NameList("attacks"), default="badnets", show_default=True,
              help="Comma-separated attacks, or 'all'; a variant as NAME@bb, NAME@all2all, NAME@bb@all2all.")
@click.option("--defenses", type=NameList("defenses"), default=None,
              help="Comma-separated defenses, or 'all'; a variant as NAME@bb.  [default: nad, or none with "
                   "--detectors]")
@click.option("--detectors", type=NameList("detectors"), default=None,
              help="Comma-separated detectors, or 'all' (`bench list detectors`): a detection cell per dataset, "
                   "attack, model and seed, on its poisoned training set (data level) or its backdoored model's "
                   "inputs (input level).")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Detectors that only score are given a decision: flag what scores above this false-positive "
                   "rate's threshold on the clean share; also the FPR at which TPR is reported.")
@click.option("--models", "students", type=NameList("models"), default="wrn-16-1", show_default=True,
              help="Student (backdoored) architectures (`bench list models`).")
@click.option("--teachers", type=NameList("models"), default=None,
              help="Teacher architectures for defenses that use one, e.g. nad (default: the student's).")
@click.option("--teacher-sources", type=click.Choice(["supplied", "scratch", "supplied,scratch"]), default="supplied",
              show_default=True, help="Where a teacher starts: the supplier's model of its architecture "
                                      "(backdoored on the same poisoned data), a fresh network, or both as cells.")
@click.option("--seeds", type=IntList(), default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--clean-shares", type=ShareList(), default=None,
              help="Shares of the training set the defender holds, a grid axis (e.g. 0.01,0.05,0.1); nested: "
                   "a seed's smaller subset lies inside its larger ones. Default: the profile's clean_share.")
@profile_option("quick: minutes on a CPU; paper: the paper's settings (GPU).")
@sets_option("Override a config field: profile.epochs=2, nad.betas=500,1000,1000, badnets.target=0.")
@machine_options
@tracking_options()
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--clean-reference", is_flag=True,
              help="Also train (once, cached) a clean model per dataset/architecture/seed and log its ACC.")
@click.option("--reactivation", is_flag=True,
              help="After each defense, the retuning attack of Min et al. (NeurIPS 2024): finetune the repaired "
                   "model 5 epochs on 1,000 training images, 5 of them poisoned, and measure the ASR it regains "
                   "(reactivated.*), beside a clean model retuned alike.")
@click.option("--rerun", type=click.Choice(["cells", "all"]), is_flag=False, flag_value="cells", default=None,
              help="Recompute cells already recorded as finished: --rerun (defense and evaluation; stored "
                   "backdoored models are reused) or --rerun all (every stage).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Run cells in N local processes (spread over the visible GPUs).")
@click.option("--cells-per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells sharing one GPU (with --workers or --executor ray).")
@click.option("--executor", type=click.Choice(["inprocess", "processes", "ray"]), default="inprocess",
              show_default=True, help="Where cells run; ray needs: pip install 'nadbench[ray]'.")
@click.option("--ray-address", default=None, help="A Ray cluster to join (default: start a local Ray).")
@click.option("--stale-after", type=float, default=1800.0, show_default=True, envvar="NADBENCH_STALE_AFTER",
              show_envvar=True, help="Seconds without a heartbeat after which a RUNNING run of another "
                                     "host is marked KILLED.")
@computing_options
@click.option("--fused", is_flag=True, envvar="NADBENCH_FUSED", show_envvar=True,
              help="Train the grid's backdoored and clean models of one architecture and schedule together, as one "
                   "stacked model per step, before the cells run (nadbench.training.fused; for GPUs, where these small "
                   "networks are launch-bound). Attacks that control training train alone.")
@click.option("--fused-max", type=click.IntRange(min=1), default=14, show_default=True, envvar="NADBENCH_FUSED_MAX",
              show_envvar=True, help="The most models --fused stacks into one; a larger group trains in chunks.")
def run(datasets, attacks, defenses, detectors, fpr, students, teachers, teacher_sources, seeds, clean_shares,
        profile_name, sets, device, data_root, tracking_uri, experiment, output, clean_reference, reactivation,
        tracking_timeout, rerun, workers, cells_per_gpu, executor, ray_address, stale_after, fused, fused_max, progress,
        precision, compile_, threads):
    """Run the grid datasets x attacks x defenses x models x seeds; log every cell to MLflow.

    \b
    Example:  bench run --attacks all --defenses nad
              bench run --attacks badnets,blend --detectors spectral,strip
    Running the same command again skips the cells already recorded as finished (see --rerun).
    Ctrl-C or SIGTERM ends the current cell (its run KILLED), writes --output with what finished,
    and exits 130 (SIGINT) or 143 (SIGTERM).
    """
    import time

    from ..engine import executors
    from ..contract.config import ConfigError
    from ..engine.runner import Runner, run_grid
    from .tables import log_grid

    registry = _registry()
    for line in registry.problems():  # e.g. a third-party package that claimed a built-in's name
        click.secho(f"warning: {line}", fg="yellow", err=True)
    detectors = detectors or []
    defenses = defenses if defenses is not None else ([] if detectors else ["nad"])
    prof, plugin_over, cells, dev = _grid(registry, datasets, attacks, defenses, students, teachers, teacher_sources,
                                          seeds, clean_shares, profile_name, sets, device, detectors)
    tracker = _grid_tracker(tracking_uri, experiment, tracking_timeout, stale_after)
    settings = run_settings(str(dev), precision, compile_, threads, fused=fused, fused_max=fused_max)
    runner = Runner(registry, prof, settings=settings, data_root=data_root, overrides=plugin_over,
                    tracker=tracker, progress=progress, clean_reference=clean_reference, rerun=rerun,
                    reactivation=reactivation, fpr=fpr)
    try:
        pool = executors.make(executor, workers, device=dev.type, threads=threads, cells_per_gpu=cells_per_gpu,
                              ray_address=ray_address)
    except ConfigError as exc:
        fail(str(exc))
    where = pool.describe if pool else "in-process"
    click.echo(f"{len(cells)} cell(s) on {dev} ({where}), profile {prof.name}; tracking to {tracker.uri}", err=True)
    start = time.perf_counter()
    grid = {"datasets": datasets, "attacks": attacks, "defenses": defenses, "detectors": detectors, "fpr": [fpr],
            "students": students, "teachers": teachers or students, "teacher_sources": [teacher_sources],
            "seeds": seeds, "clean_shares": clean_shares or [prof.clean_share]}
    params = {**{f"grid.{k}": ",".join(map(str, v)) for k, v in grid.items()}, "executor": where,
              "threads": threads or "default", "numerics": runner.keys.numerics, "profile": prof.name,
              "device": str(dev), "command": _command()}
    results, failures = [], []
    interrupted = None
    with _terminate_as_interrupt() as signalled:
        try:
            run_grid(runner, cells, name=grid_name(prof.name, datasets, attacks, [*defenses, *detectors], seeds),
                     params=params, results=results, failures=failures, executor=pool, summarise=log_grid)
        except KeyboardInterrupt:
            interrupted = 128 + (signalled[0] if signalled else signal.SIGINT)
    _grid_ended(results, failures, len(cells), time.perf_counter() - start, interrupted, output, dev, prof)


def _grid_tracker(tracking_uri, experiment, timeout: float, stale_after: float):
    """`bench run`'s tracker, checked reachable, with the runs of processes that are gone marked KILLED."""
    from ..engine.tracking import Tracker, TrackingError

    try:
        tracker = Tracker(tracking_uri, experiment, timeout=timeout)
        for run_id in tracker.reap(stale_after):
            click.echo(f"marked run {run_id} KILLED: its process is gone (tag nadbench.end_reason says how "
                       "that was told)", err=True)
    except TrackingError as exc:
        fail(str(exc), running=True)
    return tracker


def grid_name(profile_name: str, datasets, attacks, defenses, seeds) -> str:
    """A grid's run name that says what ran, e.g. ``quick · cifar10 · badnets × finetune, nad · seed 0``
    (a long list by its count: ``13 attacks``)."""
    def names(items, kind):
        return ", ".join(items) if len(items) <= 4 else f"{len(items)} {kind}"
    seeds_text = f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    return (f"{profile_name} · {names(datasets, 'datasets')} · {names(attacks, 'attacks')} × "
            f"{names(defenses, 'defenses')} · {seeds_text}")


def _grid_ended(results: list, failures: list, n_cells: int, wall: float, interrupted: int | None, output, dev,
                prof) -> None:
    """`bench run`'s end: the table, a summary, --output, the failures, and the exit code."""
    click.echo(_table(results))
    click.echo(f"wall time {wall:.0f} s; {len(results)} cell(s) finished, {len(failures)} failed"
               f"{f', interrupted ({n_cells - len(results) - len(failures)} not finished)' if interrupted else ''}. "
               f"Table: bench table; browse: bench ui", err=True)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"command": _command(), "wall_s": wall, "device": str(dev),
                                      "profile": prof.name, "results": results, "interrupted": bool(interrupted),
                                      "failures": [[c.label, e] for c, e in failures]}, indent=2))
    for cell, err in failures:
        click.echo(f"FAILED {cell.label}: {err}", err=True)
    if interrupted:
        sys.exit(interrupted)
    if failures:
        sys.exit(1)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM behaves like Ctrl-C (a KeyboardInterrupt in the main thread); the list it yields
    receives the signal number, so the exit code can say which one it was."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command() -> str:
    """The command line as a user would type it (``bench run ...``), for results files."""
    import shlex

    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _table(results: list[dict]) -> str:
    from ..engine.grid import Cell
    from . import detections as detmod
    from .tables import repairs

    found = detmod.detections(results)
    text = detmod.render(detmod.build(found), "text", found[0].get("fpr_target", 0.05)) if found else ""
    results = repairs(results)
    if not results:
        return text.rstrip("\n")

    rows = [("cell", "clean ACC", "ACC before", "ASR before", "RA before", "ACC after", "ASR after", "RA after",
             "DER", "defense s", "")]

    def pct(phase: dict, k: str) -> str:
        return f"{100 * phase[k]:.2f}" if k in phase else "-"  # no RA, DER in results recorded before them
    for r in results:
        clean = f"{100 * r['clean_model']['acc']:.2f}" if r.get("clean_model") else "-"
        rows.append((Cell(**r["cell"]).label, clean, *(pct(r["before"], k) for k in ("acc", "asr", "ra")),
                     *(pct(r["after"], k) for k in ("acc", "asr", "ra", "der")),
                     f"{r['time_defense_s']:.0f}", "(recorded before)" if r.get("reused_from") else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return text + "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                            for row in rows)


@main.command()
@click.option("--run-id", "run_ids", multiple=True,
              help="The parent run of a `bench run` (default: the newest in the experiment); several with "
                   "--leaderboard.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "json"]), default="text",
              show_default=True, help="How the table is written.")
@click.option("--paper", is_flag=True, help="Put the NAD paper's Table 1 numbers beside ours.")
@click.option("--leaderboard", is_flag=True,
              help="Rank the defenses by DER (mean over attacks, mean ± std over seeds) with ACC drop, ASR and "
                   "RA after, and reactivated ASR where measured; over one or several runs (--run-id ...), "
                   "never pooling profiles or configurations.")
@click.option("--paired", default=None, metavar="A,B",
              help="Also compare defense A with B on the same backdoored models (paired by seed): mean "
                   "difference of ASR and ACC and twice its standard error, e.g. nad,finetune.")
@click.option("--metrics", default=None, metavar="M,...",
              help="What each cell shows, of asr, acc, ra (robust accuracy: triggered images classified as "
                   "their true label), der (defense effectiveness rating, after a defense only) and an attack's "
                   "own evaluations, attack.NAME (e.g. attack.cover); with --detectors, of auroc, tpr, precision, "
                   "recall, f1, fpr.  [default: asr,acc; auroc,tpr with --detectors]")
@click.option("--detectors", "detectors_table", is_flag=True,
              help="The detectors' table instead: AUROC and TPR per attack and detector (with --leaderboard: the "
                   "detectors ranked by AUROC).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to a file.")
@tracking_options(timeout=False)
def table(run_ids, fmt, paper, leaderboard, paired, metrics, detectors_table, output, tracking_uri, experiment):
    """Table 1 from the tracked runs of a `bench run`: ASR / ACC per attack and defense (or the
    --metrics chosen), mean ± std over seeds, with an average and a deviation row.

    \b
    Example:  bench table --paper --format markdown --output table1.md
              bench table --metrics asr,acc,ra,der
              bench table --detectors
    """
    from . import detections as detmod
    from . import tables as tablemod

    if len(run_ids) > 1 and not leaderboard:
        fail("several --run-id need --leaderboard (Table 1 is one grid's)")
    checker = detmod.check_metrics if detectors_table else tablemod.check_metrics
    try:  # before the store is read: a typo is named before anything about the runs
        default = detmod.METRICS if detectors_table else tablemod.METRICS
        metrics = checker(tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else default)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics") from None
    tracker, grids = _tracked_grids(tracking_uri, experiment, run_ids)
    parent, results = grids[0]
    if detectors_table:
        _detection_table(grids, leaderboard, metrics, fmt, output)
        return
    if not tablemod.repairs(results):
        fail(f"run {parent.info.run_id} ({parent.info.run_name}) has detection cells only: bench table --detectors")
    if leaderboard:
        text = tablemod.render_leaderboard(tablemod.leaderboard([r for _, rs in grids for r in rs]), fmt)
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
        click.echo(text, nl=False)
        click.echo(f"{len(grids)} run(s): " + ", ".join(p.info.run_id for p, _ in grids), err=True)
        return
    built = tablemod.build(results, paper=paper, metrics=metrics)
    text = tablemod.render(built, fmt)
    if paired:
        a, _, b = (x.strip() for x in paired.partition(","))
        rows = tablemod.paired(results, a, b)
        if not rows:
            fail(f"--paired {paired}: no row has both defenses; defenses here: "
                 f"{', '.join(dict.fromkeys(r['cell']['defense'] for r in results))}")
        if fmt == "json":  # one JSON document
            text = json.dumps({**tablemod.to_json(built), "paired": {"a": a, "b": b, "rows": [
                {"row": list(row), **d} for row, d in rows.items()]}}, indent=2)
        else:
            text += f"\n{a} - {b}, paired by seed (points; ± twice the standard error):\n" + "\n".join(
                f"  {'/'.join(map(str, row))}: ASR {d['asr']:+.2f} ± {d['asr_2se']:.2f}, ACC {d['acc']:+.2f} ± "
                f"{d['acc_2se']:.2f} (n={d['n']})" for row, d in rows.items()) + "\n"
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    click.echo(text, nl=False)
    click.echo(f"run {parent.info.run_id} ({parent.info.run_name}), {len(results)} cell(s)", err=True)


def _detection_table(grids, leaderboard: bool, metrics, fmt: str, output) -> None:
    """`bench table --detectors`: the detection table of one grid, or the detectors' leaderboard."""
    from . import detections as detmod

    results = [r for _, rs in grids for r in rs]
    found = detmod.detections(results)
    if not found:
        fail(f"no detection cell in run(s) {', '.join(p.info.run_id for p, _ in grids)}: run a grid with "
             "--detectors (e.g. bench run --detectors spectral,strip)")
    text = (detmod.render_leaderboard(detmod.leaderboard(found), fmt) if leaderboard else
            detmod.render(detmod.build(found, metrics), fmt, found[0].get("fpr_target", 0.05)))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    click.echo(text, nl=False)
    click.echo(f"{len(grids)} run(s), {len(found)} detection cell(s)", err=True)


def _tracked_grids(tracking_uri, experiment, run_ids):
    """(tracker, [(parent run, results)]) of the grids ``run_ids`` (default: the newest), each with
    a finished cell: `bench table`'s and `bench report`'s one reader."""
    from ..engine.tracking import Tracker, TrackingError

    try:
        tracker = Tracker(tracking_uri, experiment)
        grids = [tracker.grid_results(run_id) for run_id in run_ids or [None]]
    except TrackingError as exc:
        fail(str(exc), running=True)
    for parent, results in grids:
        if not results:
            fail(f"run {parent.info.run_id} ({parent.info.run_name}) has no finished cell yet", running=True)
    return tracker, grids


@main.command()
@click.option("--run-id", "run_ids", multiple=True,
              help="The parent run of a `bench run` (default: the newest in the experiment); several for one "
                   "page over several grids.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write.")
@tracking_options(timeout=False)
def report(run_ids, output, tracking_uri, experiment):
    """One self-contained HTML page of a tracked grid (or several): what ran, Table 1 in the paper's
    layout, RA and DER, the leaderboard, each cell's figures. No server, no network: open it in any
    browser, mail it, print it.

    \b
    Example:  bench report --output report.html
    """
    from . import report as reportmod

    tracker, grids = _tracked_grids(tracking_uri, experiment, run_ids)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(reportmod.build(tracker, grids), encoding="utf-8")
    click.echo(f"wrote {output}: {len(grids)} grid(s), {sum(len(r) for _, r in grids)} finished cell(s) "
               f"({', '.join(p.info.run_id for p, _ in grids)})")


LIST_KINDS = ("datasets", "models", "attacks", "defenses", "detectors", "profile")
METHOD_KINDS = ("attacks", "defenses", "detectors")


@main.command("list")
@click.argument("what", required=False, metavar=f"[{'|'.join(LIST_KINDS)}|NAME]")
def list_(what):
    """List the registered datasets, models, attacks, defenses and detectors (providers, config
    fields), and the fields of the profiles. NAME (an attack, defense or detector, or any item) shows
    that one with its sources and its deviations from them."""
    if what == "profile":
        _list_profiles()
        return
    registry = _registry()
    if what and what not in LIST_KINDS:
        from ..engine.registry import PluginError

        try:  # a variant (sig@bb) as its method, or an error naming the method's valid variants
            found = [(k, registry.get(k, what)) for k in ("attacks", "defenses", "detectors", "models", "datasets")
                     if what in registry.items[k] or what in registry.qualified[k]
                     or ("@" in what and k in METHOD_KINDS and what.split("@")[0] in registry.items[k])]
        except PluginError as exc:
            fail(str(exc))
        if not found:
            fail(f"{what!r} is neither one of {', '.join(LIST_KINDS)} nor a registered name")
        for k, item in found:
            click.secho(k[:-1], bold=True)
            _list_item(k, what, item, sources=True)
    else:
        for k in [what] if what else ["datasets", "models", "attacks", "defenses", "detectors"]:
            click.secho(k, bold=True)
            for name in registry.names(k) + sorted(n for n in registry.qualified[k]
                                                   if n.split(":", 1)[1] in registry.ambiguous[k]):
                _list_item(k, name, registry.get(k, name))
    for line in registry.problems():
        click.secho(f"warning: {line}", fg="yellow", err=True)


def _list_item(k: str, name: str, item, sources: bool = False) -> None:
    from ..contract.config import describe
    from ..engine.grid import PROFILES, profile_values
    from ..engine.registry import spelling, variants_of
    from ..contract.sources import describe as describe_sources

    click.echo(f"  {name:<28} {item.description}  [{item.provider}]")
    if k == "detectors":
        click.echo(f"      level: {item.level}" + (" (reads the model trained on the set)" if item.level == "data"
                                                    and item.uses_model else ""))
    if k == "defenses" and item.trains:
        click.echo("      training-time: trains a model on the poisoned set (bench train; refused on attacks that "
                   "control training)")
    if sources and k in METHOD_KINDS:
        for line in describe_sources(item) or ["no sources declared"]:
            click.echo(f"      {line}")
    if k == "models" and item.attention_layers:
        click.echo(f"      attention layers: {', '.join(item.attention_layers)}")
    if k == "datasets":
        click.echo(f"      {item.num_classes} classes, {item.image_size}x{item.image_size}")
    variants = variants_of(item) if k in METHOD_KINDS else ()
    if variants:
        click.echo(f"      variants: {', '.join(f'{item.name}@{v}' for v in variants)}"
                   + (f" (combined: {spelling(item.name, variants)})" if len(variants) > 1 else ""))
    for variant, values in (item.variant_defaults.items() if k in METHOD_KINDS else ()):
        click.echo(f"      {item.name}@{variant} starts from: " + ", ".join(
            f"{f}={v}" if not isinstance(v, dict) else
            f"{f}=" + " / ".join(f"{pv} on {pn}" for pn, pv in v.items()) for f, v in values.items()))
    if k == "attacks" and item.all_datasets:
        click.echo(f"      --attacks all runs it on: {', '.join(item.all_datasets)}")
    if k in METHOD_KINDS:
        by_profile = {n: profile_values(item, p) for n, p in PROFILES.items()}
        for field, default, help_ in describe(item.Config):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            set_by = ", ".join(f"{n}: {v[field]}" for n, v in by_profile.items() if field in v)
            click.echo(f"      {item.name}.{field}={shown}  {help_}"
                       + (f" [profile {set_by}]" if set_by else ""))


def _list_profiles():
    from ..contract.config import describe
    from ..engine.grid import PROFILES, Profile

    click.secho("profile fields (set with --set profile.FIELD=VALUE)", bold=True)
    names = list(PROFILES)
    click.echo(f"  {'field':<16} " + " ".join(f"{n:<12}" for n in names) + " meaning")
    for field, _, help_ in describe(Profile):
        values = []
        for n in names:
            v = getattr(PROFILES[n], field)
            values.append(",".join(map(str, v)) if isinstance(v, tuple) else str(v))
        click.echo(f"  {field:<16} " + " ".join(f"{v:<12}" for v in values) + f" {help_}")


@main.command()
@click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks of plugins that failed.")
def plugins(verbose):
    """Installed plugins (entry points of the `nadbench` group) and those that failed to load.
    Exits 1 when a plugin failed to load or had an item refused."""
    registry = _registry()
    for info in registry.plugins:
        if info.error:
            continue
        state = "  (disabled by NADBENCH_DISABLE_PLUGINS)" if info.disabled else f"  hooks: {', '.join(info.hooks)}"
        click.echo(f"{info.name:<16} {info.distribution or '-':<22} {info.value}{state}")
    failed = registry.failed
    if failed:
        click.secho(f"\n{len(failed)} plugin(s) failed to load and were skipped:", fg="red", err=True)
        for info in failed:
            click.echo(f"{info.name:<16} {info.distribution or '-':<22} {info.value}  {info.error}", err=True)
            if verbose and info.traceback:
                click.echo(info.traceback, err=True)
    problems = registry.problems()
    if problems:
        click.secho(f"\n{len(problems)} name conflict(s):", fg="yellow", err=True)
        for line in problems:
            click.echo(f"  {line}", err=True)
    if failed or any(p.refused for p in registry.plugins):
        sys.exit(1)


def _floats(text: str | None, option: str):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5")


@main.command(renamed={"--arch": "--model", "--out": "--output", "--triggered-out": "--triggered-output"})
@click.option("--attack", "attack_name", default="badnets", show_default=True, help="A registered attack.")
@click.option("--model", "arch", default="wrn-16-1", show_default=True,
              help="A registered model architecture (`bench list models`; formerly --arch).")
@click.option("--dataset", default="cifar10", show_default=True, help="A registered dataset.")
@profile_option("How the backdoored model is trained (see `bench list profile`).")
@sets_option("Override the attack's or the profile's config: badnets.target=0, profile.epochs=5.")
@seed_option
@model_output_option("backdoored.safetensors", "Where to write the backdoored model (safetensors; formerly --out).")
@click.option("--triggered-output", "triggered_out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("triggered"), show_default=True,
              help="Folder for the triggered test images (PNG, <true label>/<n>.png; formerly --triggered-out).")
@machine_options
@computing_options
def attack(attack_name, arch, dataset, profile_name, sets, seed, output, triggered_out, device, data_root, progress,
           precision, compile_, threads):
    """Train a backdoored model to practise on: write it as safetensors, with a folder of triggered
    test images, ready for `bench defend`.

    \b
    Example:  bench attack --attack badnets --output backdoored.safetensors --triggered-output triggered
    """
    from ..contract.config import ConfigError
    from ..training.data import DataError
    from ..engine.runner import Runner, attention_layers, check_attack, configured, profile, resolve_device
    from ..engine.registry import PluginError
    from .practitioner import attack_to_files

    registry = _registry()
    try:
        attack_name = registry.canonical("attacks", attack_name)  # a variant's one spelling (its cell)
        prof_over, plugin_over = _parse_sets(sets, registry, {"attacks": [attack_name], "defenses": []})
        prof = profile(profile_name, prof_over)
        check_attack(configured(registry, "attacks", attack_name, plugin_over, prof), registry.dataset(dataset))
        attention_layers(registry, arch, dataset)
        dev = resolve_device(device)
    except (ConfigError, PluginError) as exc:
        fail(str(exc))
    runner = Runner(registry, prof, settings=run_settings(str(dev), precision, compile_, threads), data_root=data_root,
                    overrides=plugin_over, progress=progress)
    try:
        result = attack_to_files(registry, runner, attack=attack_name, arch=arch, dataset=dataset, seed=seed,
                                 out=output, triggered_dir=triggered_out)
    except (DataError, PluginError) as exc:  # a plugin that breaks the contract while training, one line
        fail(str(exc), running=True)
    own = "".join(f", {k} {100 * v:.2f}" for k, v in result.items() if k.startswith("attack."))
    click.echo(f"wrote {output}: {arch} backdoored by {attack_name} (target {result['target']}), "
               f"ACC {100 * result['acc']:.2f}, ASR {100 * result['asr']:.2f}{own} on the {dataset} test split"
               f"{' (from the cache)' if result['cache_hit'] else ''}")
    click.echo(f"wrote {result['n_triggered']} triggered test images to {triggered_out}/")
    for name, folder in result["evaluations"].items():
        click.echo(f"wrote the images of the attack's evaluation {name!r} to {folder}/")
    click.echo(f"next: bench defend {output} --model {arch} --clean {dataset}:0.05 --test {dataset} "
               f"--triggered {triggered_out}"
               + "".join(f" --evaluation {name}={folder}" for name, folder in result["evaluations"].items()))


@main.command(renamed={"--arch": "--model", "--out": "--output", "--teacher-arch": "--teacher-model"})
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--model", "arch", required=True,
              help="The model's registered architecture (`bench list models`; formerly --arch).")
@click.option("--clean", "clean_data", default=None, metavar="DATA",
              help="Your clean data: an ImageFolder folder or .tar/.tar.xz/.zip archive of one, or a registered "
                   "dataset's training split as NAME:SHARE (e.g. cifar10:0.05). Required, except for data-free "
                   "defenses (clp), which then need --test.")
@click.option("--defense", "defense_name", default="nad", show_default=True, help="A registered defense.")
@sets_option("Override the defense's config: nad.epochs=5.")
@click.option("--test", "test_data", default=None, metavar="DATA",
              help="Data for ACC (a registered dataset's test split as NAME[:SHARE], or a folder/archive); "
                   "default: a held-out 10% of the clean data.")
@click.option("--triggered", "triggered_data", default=None, metavar="DATA",
              help="Triggered images with their true labels (ImageFolder; lossless formats advised), for ASR.")
@click.option("--target", type=int, default=None,
              help="The backdoor's target label (with --triggered); default: each image's, from the folder's "
                   "targets.csv (`bench attack` writes one; all-to-all attacks need it).")
@click.option("--evaluation", "evaluation_data", multiple=True, metavar="NAME=DATA",
              help="An attack's own evaluation of its trigger (`bench attack` writes one folder per evaluation the "
                   "attack declares, e.g. triggered-cover): triggered images with their true labels and a "
                   "targets.csv; reported as attack.NAME, the share classified as their target.")
@model_output_option("repaired.safetensors",
                     "Where to write the repaired model (safetensors; formerly --out); the report goes beside it.")
@click.option("--mean", default=None, help="Input normalisation mean of a bare state dict, e.g. 0.49,0.48,0.45.")
@click.option("--std", default=None, help="Input normalisation std of a bare state dict.")
@click.option("--normalize", default=None, metavar="DATASET", help="Take mean/std from a registered dataset.")
@click.option("--teacher", "teacher_file", type=click.Path(path_type=Path), default=None,
              help="A teacher model (safetensors) for defenses that use one (NAD); default: its own.")
@click.option("--teacher-model", "teacher_arch", default=None,
              help="The teacher's architecture (default: --model's; formerly --teacher-arch).")
@click.option("--image-size", type=int, default=None,
              help="Resize folder images to this size (default: the named dataset's, else 32).")
@seed_option
@machine_options
@tracking_options(experiment="nadbench-defend")
@computing_options
def defend(model_file, arch, clean_data, defense_name, sets, test_data, triggered_data, target, evaluation_data,
           output, mean, std, normalize, teacher_file, teacher_arch, image_size, seed, device, data_root, tracking_uri,
           experiment, tracking_timeout, progress, precision, compile_, threads):
    """Repair MODEL_FILE, a model you were handed (safetensors only: pickles are refused unopened),
    with your clean data; write the repaired weights and a report of ACC/ASR before and after.

    \b
    Example:  bench defend backdoored.safetensors --model wrn-16-1 --clean cifar10:0.05 \\
                --test cifar10 --triggered triggered --target 5
    """
    import torch

    from ..contract.config import ConfigError
    from ..training.data import DataError
    from ..engine.runner import resolve_device
    from .userfiles import HandoverError, read_safetensors
    from ..engine.plan import config_values
    from ..engine.registry import PluginError
    from .practitioner import defend_file
    from ..training.settings import use
    from ..engine.tracking import Tracker, TrackingError

    registry = _registry()
    try:
        read_safetensors(model_file)  # refuse pickles and broken files before anything else
        if teacher_file:
            read_safetensors(teacher_file)
        spec, defense_cls = registry.model(arch), registry.defense(defense_name)
        if defense_cls.trains:
            fail(f"{defense_name} is a training-time defense: it trains a model on a supplied set "
                 f"(bench train --defense {defense_name}) and repairs none")
        if teacher_arch:
            registry.model(teacher_arch)
        _check_data_options(registry, defense_name, defense_cls, clean_data, test_data, triggered_data, target)
        mean_v, std_v = _normalisation(registry, normalize, mean, std)
        defense_name = registry.canonical("defenses", defense_name)
        _, plugin_over = _parse_sets(sets, registry, {"attacks": [], "defenses": [defense_name]})
        _, overrides = config_values(registry, "defenses", defense_name, plugin_over)  # a variant's defaults too
        defense_cls.from_overrides(overrides)
        dev = resolve_device(device)
        test, clean, triggered, evaluations = _user_data(registry, image_size, seed, data_root, test_data,
                                                         clean_data, triggered_data, evaluation_data)
        settings = run_settings(str(dev), precision, compile_, threads)
        if threads:
            torch.set_num_threads(threads)
        with use(settings):
            report = defend_file(registry, model_path=model_file, arch=spec.name, clean=clean,
                                 defense_name=defense_name, overrides=overrides, mean=mean_v, std=std_v, test=test,
                                 triggered=triggered, target=target, teacher_path=teacher_file,
                                 teacher_arch=teacher_arch, seed=seed, device=dev, out=output, progress=progress,
                                 make_tracker=lambda: Tracker(tracking_uri, experiment, timeout=tracking_timeout),
                                 evaluations=evaluations)
    except (HandoverError, ConfigError, PluginError, DataError) as exc:
        fail(str(exc))
    except TrackingError as exc:
        fail(str(exc), running=True)
    _echo_report(report, defense_name, output)


@main.command()
@click.argument("model_file", type=click.Path(path_type=Path), required=False)
@click.option("--detector", "detector_name", required=True, help="A registered detector (`bench list detectors`).")
@click.option("--model", "arch", default=None,
              help="MODEL_FILE's registered architecture (`bench list models`); with MODEL_FILE.")
@click.option("--data", "data_given", default=None, metavar="DATA",
              help="A training set to inspect (data-level detectors): an ImageFolder folder or archive, or a "
                   "registered dataset as NAME[:SHARE]; MODEL_FILE is then the model trained on it, where the "
                   "detector reads one.")
@click.option("--inputs", "inputs_given", default=None, metavar="DATA",
              help="Inputs to screen (input-level detectors): a folder or archive of images (class folders "
                   "optional; labels are not read), for the model MODEL_FILE.")
@click.option("--clean", "clean_data", required=True, metavar="DATA",
              help="Your clean data (folder, archive or NAME:SHARE, e.g. cifar10:0.05): what the detector may "
                   "trust, and where the threshold of a detector that only scores is drawn.")
@sets_option("Override the detector's config: strip.overlays=50.")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="A detector that only scores flags what scores above this false-positive rate's threshold on "
                   "your clean data.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("scores.csv"),
              show_default=True, help="The scores (CSV: file, score, flagged); the flagged files, the report and "
                                      "the histogram go beside it (.flagged.txt, .report.json, .scores.png).")
@click.option("--mean", default=None, help="Input normalisation mean of a bare state dict, e.g. 0.49,0.48,0.45.")
@click.option("--std", default=None, help="Input normalisation std of a bare state dict.")
@click.option("--normalize", default=None, metavar="DATASET", help="Take mean/std from a registered dataset.")
@click.option("--image-size", type=int, default=None,
              help="Resize folder images to this size (default: the named dataset's, else 32).")
@seed_option
@machine_options
@computing_options
def detect(model_file, detector_name, arch, data_given, inputs_given, clean_data, sets, fpr, output, mean, std,
           normalize, image_size, seed, device, data_root, progress, precision, compile_, threads):
    """Score a training set you were handed (--data) for poisoned images, or inputs (--inputs) for a
    trigger, with a detector and your clean data; write a score per file and the files it flags.

    \b
    Example:  bench detect --detector spectral --data handed-train/ backdoored.safetensors --model wrn-16-1 \\
                --clean cifar10:0.05
              bench detect --detector strip --inputs incoming/ backdoored.safetensors --model wrn-16-1 \\
                --clean cifar10:0.02
    """
    from ..contract.config import ConfigError
    from ..engine.plan import config_values
    from ..engine.registry import PluginError
    from ..engine.runner import resolve_device
    from ..training.data import DataError
    from ..training.settings import use
    from .screening import detect_files
    from .userfiles import HandoverError, read_safetensors

    registry = _registry()
    try:
        detector_cls = registry.detector(detector_name)
        given = {"--data": data_given, "--inputs": inputs_given}
        wanted = "--data" if detector_cls.level == "data" else "--inputs"
        if not given[wanted] or any(v for k, v in given.items() if k != wanted):
            fail(f"{detector_name} is {'a data' if wanted == '--data' else 'an input'}-level detector: give {wanted} "
                 f"(and not {'--inputs' if wanted == '--data' else '--data'})")
        if model_file is not None:
            read_safetensors(model_file)  # refuse pickles and broken files before anything else
            if not arch:
                fail("MODEL_FILE needs --model ARCH, its registered architecture (`bench list models`)")
            registry.model(arch)
        detector_name = registry.canonical("detectors", detector_name)
        _, plugin_over = _parse_sets(sets, registry, {"detectors": [detector_name]})
        _, overrides = config_values(registry, "detectors", detector_name, plugin_over)
        detector_cls.from_overrides(overrides)
        mean_v, std_v = _normalisation(registry, normalize, mean, std)
        dev = resolve_device(device)
        looked_at, names, clean = _detect_data(registry, wanted, given[wanted], clean_data, image_size, seed, data_root)
        if threads:
            import torch

            torch.set_num_threads(threads)
        with use(run_settings(str(dev), precision, compile_, threads)):
            report = detect_files(registry, detector_name=detector_name, overrides=overrides, clean=clean, names=names,
                                  data=looked_at if wanted == "--data" else None,
                                  inputs=looked_at if wanted == "--inputs" else None, model_path=model_file,
                                  arch=arch or "", mean=mean_v, std=std_v, seed=seed, device=dev, fpr=fpr, out=output,
                                  progress=progress)
    except (HandoverError, ConfigError, PluginError, DataError) as exc:
        fail(str(exc))
    click.echo(f"{detector_name} ({report['level']} level) scored {report['n_inspected']} file(s) of "
               f"{report['inspected']}; flagged {report['n_flagged']} ({report['decision']})")
    click.echo(f"wrote {report['scores']}, {report['flagged']}, {output.with_suffix('.report.json')}, "
               f"{report['figure']}")


@main.command()
@click.option("--data", "data_given", required=True, metavar="DATA",
              help="The training set you were handed: an ImageFolder folder or archive, or a registered dataset's "
                   "training split as NAME[:SHARE] (e.g. cifar10).")
@click.option("--model", "arch", default="wrn-16-1", show_default=True,
              help="The architecture to train (`bench list models`).")
@click.option("--defense", "defense_name", default="abl", show_default=True,
              help="A training-time defense (abl, filter-retrain[@DETECTOR], ...), or none for plain training.")
@profile_option("The training schedule (see `bench list profile`): epochs, lr, augmentation.")
@sets_option("Override the defense's, its detector's or the profile's config: abl.isolation=0.02, "
             "spectral.eps=0.2, profile.epochs=5.")
@click.option("--clean", "clean_data", default=None, metavar="DATA",
              help="Clean data you trust (folder, archive or NAME:SHARE), for defenses that use it (filter-retrain: "
                   "its detector's threshold).")
@click.option("--test", "test_data", default=None, metavar="DATA",
              help="Data for ACC (NAME[:SHARE] of a registered dataset's test split, or a folder/archive); "
                   "default: a held-out 10% of --data, kept out of training.")
@click.option("--triggered", "triggered_data", default=None, metavar="DATA",
              help="Triggered images with their true labels (ImageFolder), for ASR, if you have some.")
@click.option("--target", type=int, default=None, help="The backdoor's target label (with --triggered); default: "
                                                        "the folder's targets.csv.")
@click.option("--baseline", is_flag=True, help="Also train the model plainly and report it beside the defended one.")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="A detector that only scores flags rows above this false-positive rate's threshold on --clean.")
@model_output_option("trained.safetensors", "Where to write the trained model (safetensors); the report goes "
                                            "beside it.")
@click.option("--normalize", default=None, metavar="DATASET",
              help="Take the input normalisation from a registered dataset (default: --data's, or its pixels').")
@click.option("--image-size", type=int, default=None,
              help="Resize folder images to this size (default: the named dataset's, else 32).")
@seed_option
@machine_options
@tracking_options(experiment="nadbench-train")
@computing_options
def train(data_given, arch, defense_name, profile_name, sets, clean_data, test_data, triggered_data, target, baseline,
          fpr, output, normalize, image_size, seed, device, data_root, tracking_uri, experiment, tracking_timeout,
          progress, precision, compile_, threads):
    """Train a model on a training set you were handed, part of which may be poisoned, with a
    training-time defense; write the model and a report (ACC, and ASR with --triggered).

    \b
    Example:  bench train --data handed-train/ --model wrn-16-1 --defense abl --test cifar10 \\
                --triggered triggered --output model.safetensors
    """
    from ..contract.config import ConfigError
    from ..engine.registry import PluginError
    from ..engine.runner import resolve_device
    from ..engine.tracking import Tracker, TrackingError
    from ..training.data import DataError
    from ..training.settings import use
    from .training import train_file
    from .userfiles import HandoverError

    registry = _registry()
    try:
        registry.model(arch)
        defense_name, overrides, detector_over, prof = _train_configs(registry, defense_name, sets, profile_name)
        named = data_given.partition(":")[0]
        mean, std = _normalisation(registry, normalize or (named if named in registry.names("datasets") else None),
                                   None, None)
        dev = resolve_device(device)
        data = _user_data(registry, image_size, seed, data_root, None, data_given, None, ())[1]
        test, clean, triggered, _ = _user_data(registry, image_size, seed, data_root, test_data, clean_data,
                                               triggered_data, ())
        with use(run_settings(str(dev), precision, compile_, threads)):
            report = train_file(registry, data=data, arch=arch, defense_name=defense_name, overrides=overrides,
                                detector_overrides=detector_over, clean=clean, test=test, triggered=triggered,
                                target=target, prof=prof, mean=mean, std=std, seed=seed, device=dev, out=output,
                                fpr=fpr, baseline=baseline, progress=progress,
                                make_tracker=lambda: Tracker(tracking_uri, experiment, timeout=tracking_timeout))
    except (HandoverError, ConfigError, PluginError, DataError) as exc:
        fail(str(exc))
    except TrackingError as exc:
        fail(str(exc), running=True)
    for note in report["notes"]:
        click.echo(f"note: {note}")

    def metrics(m):
        return f"ACC {100 * m['acc']:.2f}" + (f", ASR {100 * m['asr']:.2f}" if "asr" in m else "")
    plain = f" (plain training: {metrics(report['before'])})" if report["before"] else ""
    click.echo(f"{defense_name}: {arch} trained on {report['n_train']} images of {report['data']}; "
               f"{metrics(report['after'])}{plain}")
    click.echo(f"took {report['time_defense_s']:.0f} s ({report['time_total_s']:.0f} s in all); wrote {output}, "
               f"{output.with_suffix('.report.json')}")


def _train_configs(registry, defense_name: str, sets, profile_name: str):
    """`bench train`'s defense (its canonical name; a repair refused), its config values and its detectors'
    with the --set overrides, and the profile."""
    from ..engine.plan import config_values
    from ..engine.runner import profile
    from .training import NONE, training_defense

    cls = training_defense(registry, defense_name)
    name = registry.canonical("defenses", defense_name) if cls else NONE
    detectors = list(cls.from_overrides(config_values(registry, "defenses", name, {})[1]).uses_detectors) if cls else []
    prof_over, plugin_over = _parse_sets(sets, registry, {"defenses": [name] if cls else [], "detectors": detectors})
    overrides = config_values(registry, "defenses", name, plugin_over)[1] if cls else {}
    if cls:
        cls.from_overrides(overrides)
    return (name, overrides, {n: config_values(registry, "detectors", n, plugin_over)[1] for n in detectors},
            profile(profile_name, prof_over))


def _detect_data(registry, wanted: str, where: str, clean_data: str, image_size, seed: int, data_root):
    """`bench detect`'s data: what is inspected (first: a missing folder is named before the clean data
    loads), each file's name, and the clean data."""
    from .practitioner import load_user_data
    from .userfiles import image_names

    size = image_size or next((registry.dataset(d.partition(":")[0]).image_size for d in (clean_data, where)
                               if d and d.partition(":")[0] in registry.names("datasets")), None)
    if wanted == "--data":
        looked_at = load_user_data(registry, where, train=True, image_size=size, seed=seed, data_root=data_root)
    else:
        looked_at = _inputs(where, size or 32)
    names = (image_names(where, flat=wanted == "--inputs") if Path(where).exists()
             else [f"{where}#{i}" for i in range(len(looked_at.split))])
    clean = load_user_data(registry, clean_data, train=True, image_size=size, seed=seed, data_root=data_root)
    return looked_at, names, clean


def _inputs(where: str, size: int):
    """Inputs to screen: a folder or archive of images, in class folders or not (labels unused)."""
    from .practitioner import UserData
    from .userfiles import load_image_folder

    split, _, resized = load_image_folder(where, size, flat=True)
    note = f"resized {resized} of {len(split)} images to {size}x{size}" if resized else ""
    return UserData(split, int(split.labels.max()) + 1 if len(split) else 0, where, note)


def _normalisation(registry, normalize: str | None, mean: str | None, std: str | None):
    """(mean, std) of --normalize DATASET or of --mean/--std (a bare state dict's), not both."""
    if normalize and (mean or std):
        fail("give either --normalize or --mean/--std, not both")
    norm = registry.dataset(normalize) if normalize else None
    return (norm.mean, norm.std) if norm else (_floats(mean, "--mean"), _floats(std, "--std"))


def _user_data(registry, image_size, seed, data_root, test_data, clean_data, triggered_data, evaluation_data):
    """`bench defend`'s data as ``UserData`` (test, clean, triggered, evaluations by name), folders
    resized to ``image_size`` or, without it, to the named dataset's size."""
    from .practitioner import load_user_data

    size = image_size or next((registry.dataset(d.partition(":")[0]).image_size
                               for d in (clean_data, test_data) if d and d.partition(":")[0]
                               in registry.names("datasets")), None)

    def load(text, train=False):
        return load_user_data(registry, text, train=train, image_size=size, seed=seed, data_root=data_root)
    evaluations = {}
    for item in evaluation_data:
        name, eq, where = item.partition("=")
        if not eq or not name.isidentifier() or not where:
            fail(f"--evaluation {item!r}: expected NAME=DATA, e.g. cover=triggered-cover")
        evaluations[name] = where
    return (load(test_data) if test_data else None, load(clean_data, train=True) if clean_data else None,
            load(triggered_data) if triggered_data else None, {n: load(w) for n, w in evaluations.items()})


def _check_data_options(registry, defense_name: str, defense_cls, clean_data, test_data, triggered_data, target):
    """`bench defend`'s data options that only make sense together, refused in one line each."""
    if clean_data is None and defense_cls.uses_clean_data:
        free = [n for n in registry.names("defenses") if not registry.defense(n).uses_clean_data]
        fail(f"--clean is required: {defense_name} repairs the model with clean data (data-free defenses, "
              f"which run without it: {', '.join(free) or 'none registered'})")
    if clean_data is None and test_data is None:
        fail(f"{defense_name} reads no data, but ACC needs some: give --test (or --clean)")
    if target is not None and triggered_data is None:
        fail("--target goes with --triggered: ASR needs the triggered images and their target label")


def _echo_report(report: dict, defense_name: str, out: Path) -> None:
    """`bench defend`'s printed report: notes, ACC/ASR/RA and the attack's evaluations before and
    after, DER, the time and the files written."""
    for note in report["notes"]:
        click.echo(f"note: {note}")
    rows = [("", "before", "after"), ("ACC", report["before"]["acc"], report["after"]["acc"])]
    if "asr" in report["before"]:
        rows.append(("ASR", report["before"]["asr"], report["after"]["asr"]))
        rows.append(("RA", report["before"]["ra"], report["after"]["ra"]))
    rows += [(k, v, report["after"][k]) for k, v in report["before"].items() if k.startswith("attack.")]
    width = max(4, *(len(name) for name, _, _ in rows))
    for name, b, a in rows:
        click.echo(f"{name:<{width}} {b:>8}  {a:>8}" if not name else
                   f"{name:<{width}} {100 * b:>7.2f}%  {100 * a:>7.2f}%")
    if "der" in report["after"]:
        click.echo(f"DER  {100 * report['after']['der']:.2f}  (defense effectiveness: 50 = no change, 100 = "
                   "backdoor removed at no accuracy cost)")
    click.echo(f"{defense_name} took {report['time_defense_s']:.0f} s ({report['time_total_s']:.0f} s in all); "
               f"wrote {out}, {out.with_suffix('.report.json')}"
               + (f", {report['attention']}" if report.get("attention") else ""))


@main.group()
def cache():
    """The cache of decoded datasets and trained models ($NADBENCH_CACHE, default ~/.cache/nadbench)."""


def _cache_parts() -> dict[str, Path]:
    from ..training.data import DATASETS_DIR, cache_dir
    from ..engine.runner import MODELS_DIR, POISON_DIR

    root = cache_dir()
    return {"datasets": root / DATASETS_DIR, "poison": root / POISON_DIR, "models": root / MODELS_DIR}


def _entries(folder: Path):
    """(path, why it is unreachable or None) of each stored stage entry in ``folder``."""
    from safetensors import safe_open

    from ..engine.plan import unreachable

    registry = _registry()
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), "pt") as f:
                text = (f.metadata() or {}).get("key", "")
        except Exception as exc:  # noqa: BLE001 — a broken file: no key reaches it
            yield path, f"unreadable ({type(exc).__name__})"
            continue
        yield path, unreachable(text, registry)


@cache.command("info")
def cache_info():
    """Where the cache lives, how many files and bytes each part holds, and how many stored stages
    no key of the current code can reach (their stage's or plugin's code changed since)."""
    parts = _cache_parts()
    click.echo(f"cache: {next(iter(parts.values())).parent}")
    for name, folder in parts.items():
        files = [f for f in folder.glob("*.safetensors")] if folder.is_dir() else []
        size = sum(f.stat().st_size for f in files)
        line = f"  {name:<9} {len(files):>5} file(s) {size / 2**20:>9.1f} MiB  {folder}"
        if name != "datasets":
            stale = [p for p, why in _entries(folder) if why]
            line += f"  ({len(stale)} unreachable: bench cache clear --unreachable)" if stale else ""
        click.echo(line)


@cache.command("clear")
@click.argument("part", required=False, type=click.Choice(["datasets", "poison", "models"]))
@click.option("--unreachable", is_flag=True,
              help="Only the stored poisonings and models no key of the current code can reach, saying why.")
def cache_clear(part, unreachable):
    """Delete the cached models and datasets (or one PART): they are recomputed when next needed."""
    for name, folder in _cache_parts().items():
        if part not in (None, name) or not folder.is_dir():
            continue
        if not unreachable:
            shutil.rmtree(folder)
            click.echo(f"cleared {folder}")
        elif name != "datasets":
            removed = 0
            for path, why in _entries(folder):
                if why:
                    path.unlink(missing_ok=True)
                    removed += 1
                    click.echo(f"removed {path.name}: {why}")
            click.echo(f"{name}: removed {removed} unreachable entr{'y' if removed == 1 else 'ies'}")


@main.command()
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table here (e.g. docs/fidelity.md) instead of to stdout.")
@click.option("--check", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Exit 1 when this file is not the table the declarations generate.")
def fidelity(output, check):
    """The fidelity table: each built-in method's sources and deviations (docs/fidelity.md)."""
    from .fidelity import main as fidelity_main

    sys.exit(fidelity_main(["--check", str(check)] if check else ["--output", str(output)] if output else []))


@main.command()
@tracking_options(timeout=False)
@click.option("--port", default=5000, show_default=True, help="The port the UI serves on.")
def ui(tracking_uri, experiment, port):
    """Open the MLflow UI on the results store, bound to localhost."""
    from ..engine.tracking import Tracker, artifact_root

    tracker = Tracker(tracking_uri, experiment)
    mlflow = shutil.which("mlflow") or f"{sys.executable} -m mlflow"
    cmd = mlflow.split() + ["ui", "--backend-store-uri", tracker.uri, "--default-artifact-root",
                            artifact_root(tracker.uri), "--host", "127.0.0.1", "--port", str(port)]
    click.echo(f"Runs table: {tracker.ui_link('127.0.0.1', port)}")
    environment.mlflow_ui()
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
