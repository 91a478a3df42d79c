"""Superficial safety: do repaired models regain their backdoor after Min et al.'s retuning attack
faster than a clean model learns it? (nadbench.reactivation; `bench run --reactivation`.)

    python benchmarks/reactivation.py -- --attacks badnets,blend --defenses finetune,nad,fst,i-bau --seeds 0,1,2

runs `bench run --profile quick --reactivation --output benchmarks/results/reactivation-quick.json` with
the arguments after `--`, then renders benchmarks/results/reactivation-quick.md: the cells' ASR / ACC /
RA / DER, the defenses' leaderboard, and per attack and defense the reactivated ASR against the clean
model's after the same retuning. A defense is **superficially safe** on an attack when its reactivated
ASR exceeds the clean model's by more than twice the standard error of the paired difference over
the seeds (the issue's criterion). `--render-only` re-renders the JSON. Run it alone: the file gives
the grid's wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from table1 import _machine  # noqa: E402


def superficial(results: list[dict]) -> list[dict]:
    """Per (attack, defense): reactivated ASR of the repaired and of the clean model (mean over
    seeds, in %), the paired difference's mean and twice its standard error, and the verdict."""
    rows = {}
    for r in results:
        if r.get("reactivated"):
            key = (r["cell"]["attack"], r["cell"]["defense"])
            rows.setdefault(key, []).append((100 * r["after"]["asr"], 100 * r["reactivated"]["asr"],
                                             100 * r["reactivated"]["clean"]["asr"]))
    out = []
    for (attack, defense), values in rows.items():
        diffs = [rep - clean for _, rep, clean in values]
        se2 = 2 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        mean = statistics.fmean(diffs)
        out.append({"attack": attack, "defense": defense, "seeds": len(values),
                    "asr_after": statistics.fmean(v[0] for v in values),
                    "reactivated": statistics.fmean(v[1] for v in values),
                    "reactivated_sd": statistics.stdev(v[1] for v in values) if len(values) > 1 else 0.0,
                    "clean": statistics.fmean(v[2] for v in values), "diff": mean, "diff_2se": se2,
                    "superficial": bool(mean > se2) if not math.isnan(se2) else None})
    return out


def render(data: dict) -> str:
    from nadbench import table

    results = data["results"]
    lines = ["# Superficial safety: the reactivation check, profile `quick`", "",
             f"Made by: `{data.get('made_by', 'bench run')}`  ", f"Grid command: `{data['command']}`  ",
             f"Device: {data['device']}; wall time of the grid {data['wall_s'] / 60:.1f} min; machine: "
             f"{data.get('machine', _machine())}", "",
             table.render(table.build(results, metrics=("asr", "acc", "ra", "der")), "markdown"),
             "## Leaderboard", "", table.render_leaderboard(table.leaderboard(results), "markdown"),
             "## Reactivated ASR against a clean model's", "",
             "After the defense, each repaired model is finetuned 5 epochs on 1,000 training images, 5 of them "
             "poisoned (SGD lr 0.01, momentum 0.9, batch 128); the clean model of the same seed is retuned on the "
             "same images. ASR in %, mean over seeds; the difference is paired by seed (± twice its standard "
             "error). Superficially safe: the difference exceeds twice its standard error.", "",
             "| attack | defense | seeds | ASR after | reactivated ASR | clean model reactivated | difference | "
             "superficially safe |", "|" + " --- |" * 8]
    for e in superficial(results):
        verdict = {True: "**yes**", False: "no", None: "-"}[e["superficial"]]
        lines.append(f"| {e['attack']} | {e['defense']} | {e['seeds']} | {e['asr_after']:.2f} | "
                     f"{e['reactivated']:.2f} ± {e['reactivated_sd']:.2f} | {e['clean']:.2f} | "
                     f"{e['diff']:+.2f} ± {e['diff_2se']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("bench_args", nargs="*", help="passed to `bench run` (put them after --)")
    args = parser.parse_args()
    out = HERE / "results" / "reactivation-quick.json"
    if not args.render_only:
        rel = os.path.relpath(out)
        code = subprocess.call([sys.executable, "-m", "nadbench.cli", "run", "--profile", "quick", "--reactivation",
                                "--output", rel, *args.bench_args])
        if not out.exists():
            sys.exit(code)
        data = json.loads(out.read_text())
        data["made_by"] = "python benchmarks/reactivation.py " + " ".join(sys.argv[1:])
        data["machine"] = _machine()
        data["command"] = data["command"].replace(rel, os.path.relpath(out, HERE.parent))
        out.write_text(json.dumps(data, indent=2))
    md = out.with_suffix(".md")
    md.write_text(render(json.loads(out.read_text())))
    print(md.read_text())


if __name__ == "__main__":
    main()
