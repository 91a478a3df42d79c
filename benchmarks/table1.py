"""Reproduce the NAD paper's Table 1: ASR / ACC of every attack before and after every defense.

    python benchmarks/table1.py --profile quick -- --attacks badnets --defenses finetune,nad

runs `bench run` with the given profile (extra arguments after `--` go to `bench run`), keeps
its JSON results in benchmarks/results/table1-<profile>[-<tag>].json and renders
benchmarks/results/table1-<profile>[-<tag>].md (`bench table --paper`'s table: mean ± std over seeds,
the paper's numbers beside ours) with the command and the machine. `--render-only` re-renders an existing JSON file.
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


def _reused_note(results: list[dict]) -> str:
    reused = sum(1 for r in results if r.get("reused_from"))
    return (f" {reused} of {len(results)} cells were recorded by earlier runs of the same cells (same keys) and "
            "reused, so the wall time above is not theirs; `time_defense_s` in the JSON is each cell's own."
            if reused else "")


def render(results: dict) -> str:
    """The results file as Markdown: how it was made, then `bench table --paper`'s table."""
    from nadbench import table

    lines = [f"# Table 1 reproduction, profile `{results['profile']}`", "",
             f"Made by: `{results.get('made_by', 'bench run')}`  ",
             f"Grid command: `{results['command']}`  ", f"Device: {results['device']}; wall time of the grid "
             f"{results['wall_s'] / 60:.1f} min; machine: {platform.machine()}, {os.cpu_count()} cores", "",
             "ACC is over the whole test set (or the profile's test subset)."
             + _reused_note(results["results"]), "",
             table.render(table.build(results["results"], paper=True), "markdown")]
    clean = {(r["cell"]["dataset"], r["cell"]["student"], r["cell"]["seed"]): r["clean_model"]["acc"]
             for r in results["results"] if r.get("clean_model")}
    if clean:
        lines += ["", "Clean models (same profile, no poisoning), ACC in %: " + ", ".join(
            f"{d}/{s}/seed{seed}: {100 * acc:.2f}" for (d, s, seed), acc in sorted(clean.items()))]
    if results.get("failures"):
        lines += ["", "Failed cells:"] + [f"- {c}: {e}" for c, e in results["failures"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("bench_args", nargs="*", help="passed to `bench run` (put them after --)")
    args = parser.parse_args()
    out = HERE / "results" / f"table1-{args.profile}{'-' + args.tag if args.tag else ''}.json"
    if not args.render_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out)
        cmd = [sys.executable, "-m", "nadbench.cli", "run", "--profile", args.profile, "--output", rel,
               *args.bench_args]
        code = subprocess.call(cmd)
        if not out.exists():
            sys.exit(code)
    results = json.loads(out.read_text())
    if not args.render_only:
        results["made_by"] = "python benchmarks/table1.py " + " ".join(sys.argv[1:])
        # Record the output path as seen from the repository root, wherever the grid ran.
        results["command"] = results["command"].replace(rel, os.path.relpath(out, HERE.parent))
        out.write_text(json.dumps(results, indent=2))
    md = out.with_suffix(".md")
    md.write_text(render(results))
    print(md.read_text())


if __name__ == "__main__":
    main()
