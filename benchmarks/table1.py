"""Reproduce the NAD paper's Table 1: ASR / ACC of every attack before and after every defense.

    python benchmarks/table1.py --profile quick -- --attacks badnets --defenses finetune,nad

runs `bench run` with the given profile (extra arguments after `--` go to `bench run`), keeps
its JSON results in benchmarks/results/table1-<profile>[-<tag>].json and renders
benchmarks/results/table1-<profile>[-<tag>].md (`bench table --paper`'s table: mean ± std over seeds,
the paper's numbers beside ours) with the command and the machine. `--render-only` re-renders an existing JSON file;
`--include TAG[:ATTACK,...]` adds the cells (or those rows) of another results file of the same profile to
the table: Refool runs on GTSRB, the other attacks on CIFAR-10, so Table 1 comes from two grids;
`--render-only --tag NAME` with includes alone composes a table from finished grids.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


# Published numbers without the NAD paper's: BackdoorBench's leaderboard, CIFAR-10, PreAct-ResNet-18,
# poisoning 10 %, all-to-one, target 0; 100 epochs (SGD lr 0.01, cosine, batch 128); FT and NAD on 5 %
# clean data. (ASR, ACC) in % per defense. Source: github.com/backdoorbench/backdoorbench.github.io,
# leaderboard-cifar10.html, tab "Poisoning Ratio=10%", commit b98eab46d5478b03cbb13831836a07754dbc46c6
# (the same numbers, BppAttack's aside, in static/data/results.csv and SCLBD/BackdoorBench v1's README;
# the defenses the page does not show, fine-pruning to neural-cleanse, are from that results.csv: its
# rows dataset cifar10, backbone preactresnet18, ratio 0.1; a blank or -100 there is left out here).
# ABL's (a training-time defense: `abl@bb` is BackdoorBench's settings) are from static/data/results.csv at
# commit a4ef038b2c202d29d679f9c449635676cfc44544, the same rows.
# None for FTrojan, Adap-Blend, Refool or any all-to-all attack there, nor for FT-SAM, FST or MCR. SSBA's
# numbers match no row of ours: our `stegastamp` is its trigger generator without its sample-specific
# trigger (plugins/attacks/stegastamp.py).
BACKDOORBENCH = {
    "badnets": {"none": (95.03, 91.32), "finetune": (1.48, 89.96), "fine-pruning": (57.13, 91.31), "nad": (2.14, 89.87), "neural-cleanse": (1.27, 89.05), "anp": (0.73, 84.17), "abl": (0.00, 83.32)},
    "trojan": {"none": (100.00, 93.42), "finetune": (5.99, 92.42), "nad": (3.73, 91.88), "neural-cleanse": (8.22, 91.76), "anp": (0.20, 86.87), "clp": (100.00, 92.98), "i-bau": (2.91, 90.37), "abl": (100.00, 11.07)},
    "blend": {"none": (99.92, 93.47), "finetune": (96.11, 92.78), "fine-pruning": (99.26, 93.17), "nad": (97.69, 92.17), "neural-cleanse": (99.92, 93.47), "anp": (2.19, 86.58), "clp": (99.74, 91.32), "i-bau": (50.53, 87.00), "abl": (0.73, 77.30)},
    "cl": {"none": (99.92, 84.59), "finetune": (11.34, 90.83), "fine-pruning": (0.44, 89.53), "nad": (11.28, 90.54), "neural-cleanse": (6.99, 90.43), "anp": (4.81, 82.16), "abl": (0.00, 71.84)},
    "sig": {"none": (98.27, 84.48), "finetune": (2.37, 90.80), "fine-pruning": (26.20, 89.10), "nad": (10.66, 90.02), "neural-cleanse": (98.27, 84.48), "anp": (0.01, 77.97), "clp": (98.91, 83.80), "i-bau": (3.68, 85.67), "abl": (0.00, 57.80)},
    "wanet": {"none": (89.73, 91.25), "finetune": (17.10, 93.48), "fine-pruning": (1.09, 91.46), "nad": (22.98, 93.17), "neural-cleanse": (7.53, 91.80), "anp": (0.43, 85.73), "clp": (78.42, 81.91), "i-bau": (5.21, 89.49), "abl": (0.00, 83.19)},
    "iad": {"none": (98.26, 90.67), "finetune": (1.72, 93.12), "fine-pruning": (0.04, 91.74), "nad": (1.68, 93.18), "neural-cleanse": (0.76, 92.61), "anp": (1.64, 90.36), "clp": (2.17, 90.30), "i-bau": (27.08, 89.17), "abl": (90.16, 63.19)},
    "bppattack": {"none": (99.78, 90.69), "finetune": (2.54, 93.25), "nad": (2.46, 92.81)},
    "lf": {"none": (99.28, 93.19), "finetune": (78.44, 92.37), "fine-pruning": (98.97, 92.90), "nad": (47.83, 92.37), "neural-cleanse": (1.41, 91.62), "anp": (0.60, 85.15), "clp": (99.18, 92.84), "i-bau": (44.96, 84.36), "abl": (0.21, 81.72)},
    "ssba": {"none": (97.86, 92.88), "finetune": (74.79, 92.14), "fine-pruning": (83.50, 92.54), "nad": (77.40, 91.91), "neural-cleanse": (0.58, 90.99), "anp": (0.39, 86.54), "clp": (68.13, 91.38), "i-bau": (3.97, 87.67), "abl": (0.00, 80.79)},
}

# Defenses whose BackdoorBench script picks its pruning threshold by the lowest test ASR within acc_ratio of
# the test ACC (defense/anp.py, defense/rnp.py): their published numbers are an oracle's, which a table says.
ORACLE_SELECTED = ("anp", "rnp")


def at_bb(registry, kind: str, name: str) -> tuple[str, bool] | None:
    """BackdoorBench's name for one of our rows (attack) or columns (defense), and whether it ran at
    BackdoorBench's settings: a method that declares ``NAME@bb`` (BackdoorBench's settings differ from
    its authors') does only as ``NAME@bb``; its plain name runs at the authors'. None for any other
    variant (``@all2all``: BackdoorBench's leaderboard has none)."""
    from nadbench.engine.registry import PluginError

    base, *variants = name.split("@")
    if set(variants) - {"bb"}:
        return None
    try:
        declares = "bb" in registry.get(kind, base).variant_defaults
    except PluginError:  # "none", or a method this install lacks
        declares = False
    return base, bool(variants) or not declares


def published(cells: list[dict]) -> list[str]:
    """Our CIFAR-10 rows beside BackdoorBench's (ASR / ACC), for the attacks it reports: a method
    with a ``@bb`` variant at matching settings only as ``NAME@bb``; its plain row or column is marked
    as ours at the authors' settings."""
    from nadbench.commands import tables as table
    from nadbench.engine.registry import get_registry

    registry = get_registry()
    t = table.build([r for r in cells if r["cell"]["dataset"] == "cifar10"])
    known = {d for theirs in BACKDOORBENCH.values() for d in theirs}
    defenses = [(d, at) for d in t.defenses if (at := at_bb(registry, "defenses", d)) and at[0] in known]
    authors = " (authors' settings)"
    lines = ["| attack | " + " | ".join(f"{d}: ours{'' if same else authors} | {d}: BackdoorBench"
                                        for d, (_, same) in defenses) + " |",
             "|" + " --- |" * (1 + 2 * len(defenses))]
    found = marked = False
    for row, entry in t.rows.items():
        at = at_bb(registry, "attacks", row[1])
        theirs = BACKDOORBENCH.get(at[0]) if at else None
        if not theirs:
            continue
        found = True
        cols = []
        for d, (bb_name, _) in defenses:
            ours = entry.get(d)
            cols.append(f"{ours['asr'].mean:.2f} / {ours['acc'].mean:.2f}" if ours else "-")
            cols.append("{:.2f} / {:.2f}".format(*theirs[bb_name]) if bb_name in theirs else "-")
        marked |= not at[1] or any(not same for _, (_, same) in defenses)
        lines.append(f"| {row[1]}{'' if at[1] else authors} | " + " | ".join(cols) + " |")
    note = ("Published numbers beside ours (ASR / ACC in %): BackdoorBench's leaderboard, CIFAR-10, "
            "PreAct-ResNet-18, 10 % poisoning, target 0, 100 epochs; defenses on 5 % clean data "
            "(benchmarks/table1.py, BACKDOORBENCH, names the source). Ours: WRN-16-1, this profile.")
    if marked:
        note += (" A row or column marked \"authors' settings\" is ours at its authors' settings where "
                 "BackdoorBench's differ: NAME@bb runs at theirs (`bench list NAME`).")
    oracle = [d.upper() for d, (bb_name, _) in defenses if bb_name in ORACLE_SELECTED]
    if oracle:
        note += (f" BackdoorBench's {' and '.join(oracle)} numbers are oracle-selected: among the pruning thresholds "
                 "within acc_ratio of the test ACC, its script keeps the one of lowest test ASR; ours (the held-out "
                 "rule) reads no ASR.")
    return ["", note, "", *lines] if found else []


def _reused_note(results: list[dict]) -> str:
    reused = sum(1 for r in results if r.get("reused_from"))
    return (f" {reused} of {len(results)} cells were recorded by earlier runs of the same cells (same keys) and "
            "reused, so the wall time above is not theirs; `time_defense_s` in the JSON is each cell's own."
            if reused else "")


def render(parts: list[tuple[dict, set[str] | None]], composed_by: str = "") -> str:
    """Results files as Markdown: how each was made, then `bench table --paper`'s table over their
    cells (of each file, only the attacks named beside it, when named)."""
    from nadbench.commands import tables as table

    lines = [f"# Table 1 reproduction, profile `{parts[0][0]['profile']}`", ""]
    if composed_by:
        lines += [f"Composed by: `{composed_by}`, from the grids below.", ""]
    for res, attacks in parts:
        only = f" (rows taken here: {', '.join(sorted(attacks))})" if attacks else ""
        lines += [f"Made by: `{res.get('made_by', 'bench run')}`{only}  ",
                  f"Grid command: `{res['command']}`  ", f"Device: {res['device']}; wall time of the grid "
                  f"{res['wall_s'] / 60:.1f} min; machine: {res.get('machine', _machine())}"
                  + ("; interrupted (cells not finished are absent)" if res.get("interrupted") else ""), ""]
    cells = [r for res, attacks in parts for r in res["results"] if not attacks or r["cell"]["attack"] in attacks]
    lines += ["ACC is over the whole test set (or the profile's test subset)." + _reused_note(cells), "",
              table.render(table.build(cells, paper=True), "markdown")]
    lines += published(cells)
    clean = {(r["cell"]["dataset"], r["cell"]["student"], r["cell"]["seed"]): r["clean_model"]["acc"]
             for r in cells if r.get("clean_model")}
    if clean:
        lines += ["", "Clean models (same profile, no poisoning), ACC in %: " + ", ".join(
            f"{d}/{s}/seed{seed}: {100 * acc:.2f}" for (d, s, seed), acc in sorted(clean.items()))]
    curves = [r for r in cells if (r.get("extras") or {}).get("points")]
    if curves:  # a defense's extra models (MCR: points along its curve), as the engine evaluated them
        axis = curves[0]["extras"]["axis"]
        ts = [p[axis] for p in curves[0]["extras"]["points"]]
        lines += ["", f"Extra models the defenses returned, along `{axis}` (MCR: points on its curve), ASR / ACC in %:", "",
                  "| dataset | attack | defense | " + " | ".join(f"{axis} = {t:g}" for t in ts) + " |",
                  "|" + " --- |" * (3 + len(ts))]
        for r in curves:
            c = r["cell"]
            values = " | ".join(f"{100 * p['asr']:.1f} / {100 * p['acc']:.1f}" for p in r["extras"]["points"])
            lines.append(f"| {c['dataset']} | {c['attack']} | {c['defense']} (seed {c['seed']}) | {values} |")
    failures = [f for res, _ in parts for f in res.get("failures") or []]
    if failures:
        lines += ["", "Failed cells:"] + [f"- {c}: {e}" for c, e in failures]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--include", action="append", default=[], metavar="TAG[:ATTACK,...]",
                        help="also tabulate table1-<profile>-TAG.json, or only its rows of these attacks "
                             "(repeatable; with --render-only, --tag may name a table made of includes alone)")
    parser.add_argument("bench_args", nargs="*", help="passed to `bench run` (put them after --)")
    args = parser.parse_args()
    def name(tag: str) -> Path:
        return HERE / "results" / f"table1-{args.profile}{'-' + tag if tag else ''}.json"
    out = name(args.tag)
    if not args.render_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out)
        cmd = [sys.executable, "-m", "nadbench.commands.cli", "run", "--profile", args.profile, "--output", rel,
               *args.bench_args]
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # bench run got it too: it writes what finished, then we render that
            code = proc.wait()
        if not out.exists():
            sys.exit(code)
    parts = []
    for item in args.include:
        tag, _, attacks = item.partition(":")
        parts.append((json.loads(name(tag).read_text()), set(attacks.split(",")) if attacks else None))
    composed = ""
    if out.exists():
        results = json.loads(out.read_text())
        if not args.render_only:
            results["made_by"] = "python benchmarks/table1.py " + " ".join(sys.argv[1:])
            results["machine"] = _machine()
            # Record the output path as seen from the repository root, wherever the grid ran.
            results["command"] = results["command"].replace(rel, os.path.relpath(out, HERE.parent))
            out.write_text(json.dumps(results, indent=2))
        parts.insert(0, (results, None))
    elif not parts:
        sys.exit(f"{out} does not exist (run the grid, or compose a table with --include)")
    else:
        composed = "python benchmarks/table1.py " + " ".join(sys.argv[1:])
    md = out.with_suffix(".md")
    md.write_text(render(parts, composed))
    print(md.read_text())


if __name__ == "__main__":
    main()
