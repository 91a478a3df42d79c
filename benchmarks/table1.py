"""Reproduce the NAD paper's Table 1: ASR / ACC of every attack before and after every defense.

    python benchmarks/table1.py --profile quick -- --attacks badnets --defenses finetune,nad

runs `bench run` with the given profile (extra arguments after `--` go to `bench run`), keeps
its JSON results in benchmarks/results/table1-<profile>[-<tag>].json and renders
benchmarks/results/table1-<profile>[-<tag>].md with the paper's numbers beside ours, the command and the
machine. `--render-only` re-renders an existing JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Table 1 of Li et al. (ICLR 2021), (ASR, ACC) in %; Refool on GTSRB, the rest CIFAR-10 / WRN-16-1.
PAPER = {
    "badnets": {"none": (100, 85.65), "finetune": (17.18, 81.22), "fine-pruning": (99.73, 81.14),
                "mcr": (4.65, 80.94), "nad": (4.77, 81.17)},
    "trojan": {"none": (100, 81.24), "finetune": (71.76, 77.88), "fine-pruning": (41.00, 78.17),
               "mcr": (41.25, 78.76), "nad": (19.63, 79.16)},
    "blend": {"none": (99.97, 84.95), "finetune": (36.60, 81.22), "fine-pruning": (93.62, 81.13),
              "mcr": (64.33, 80.34), "nad": (4.04, 81.68)},
    "cl": {"none": (99.21, 82.43), "finetune": (75.08, 81.73), "fine-pruning": (29.88, 79.32),
           "mcr": (32.95, 79.04), "nad": (9.18, 80.34)},
    "sig": {"none": (99.91, 84.36), "finetune": (9.18, 81.28), "fine-pruning": (74.26, 81.60),
            "mcr": (1.62, 80.94), "nad": (2.52, 81.95)},
    "refool": {"none": (95.16, 82.38), "finetune": (14.38, 80.34), "fine-pruning": (63.49, 80.64),
               "mcr": (8.76, 78.84), "nad": (3.18, 80.73)},
}


def _fmt(values: list[float]) -> str:
    """Mean over seeds, with the spread (min-max) when there are several."""
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.1f}-{max(values):.1f})"


def render(results: dict) -> str:
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results["results"]:
        a, d = r["cell"]["attack"], r["cell"]["defense"]
        for phase, defense in (("before", "none"), ("after", d)):
            entry = cells.setdefault((a, defense), {"asr": [], "acc": [], "seeds": set()})
            if phase == "before" and r["cell"]["seed"] in entry["seeds"]:
                continue  # the same backdoored model appears once per defense
            entry["seeds"].add(r["cell"]["seed"])
            entry["asr"].append(100 * r[phase]["asr"])
            entry["acc"].append(100 * r[phase]["acc"])
    attacks = list(dict.fromkeys(a for a, _ in cells))
    defenses = ["none"] + list(dict.fromkeys(d for _, d in cells if d != "none"))
    lines = [f"# Table 1 reproduction, profile `{results['profile']}`", "",
             f"Made by: `{results.get('made_by', 'bench run')}`  ",
             f"Grid command: `{results['command']}`  ", f"Device: {results['device']}; wall time of the grid "
             f"{results['wall_s'] / 60:.1f} min; machine: {platform.machine()}, {os.cpu_count()} cores", "",
             "ASR / ACC in %, ours (mean over seeds; range in brackets) and the paper's in italics. "
             "ACC is over the whole test set.", "",
             "| attack | " + " | ".join("no defense" if d == "none" else d for d in defenses) + " |",
             "| --- |" + " --- |" * len(defenses)]
    for a in attacks:
        row = [a]
        for d in defenses:
            ours = cells.get((a, d))
            paper = PAPER.get(a, {}).get(d)
            text = f"{_fmt(ours['asr'])} / {_fmt(ours['acc'])}" if ours else "-"
            if paper:
                text += f" <br>*{paper[0]} / {paper[1]}*"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
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
