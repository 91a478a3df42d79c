"""The persistence study: how much of a backdoor survives finetuning, as a function of how the
backdoored model was trained and of the finetuning learning rate, with NAD beside it.

    python benchmarks/persistence.py                       # every point, one after the other
    python benchmarks/persistence.py --points quick,step10 --jobs 2 --tracking-dir /tmp/stores -- --workers 2
    python benchmarks/persistence.py --render-only

Each point is a variant of the quick profile (``--set profile.…``). For each point and each
finetuning lr (``profile.finetune_lr``: finetuning and NAD alike) it runs
``bench run --profile quick --attacks badnets,blend --defenses finetune,nad --seeds 0`` and keeps the
JSON in benchmarks/results/persistence/<point>-lr<lr>.json; the lrs of a point run in sequence, so
the second reuses the backdoored models of the first. Then it renders benchmarks/results/persistence.md.

"Persistent like the paper's" (the issue's criterion): finetuning leaves >= 30 % ASR on Blend while
NAD brings it under 10 %. The points fall in two groups: four that cost the quick profile's backdoor
training (500,000 images seen: ~17-20 min on the 2-core development CPU), trading epochs against
data (10 epochs of 50,000 images or 40 of 12,500) and one-cycle against the paper's step schedule;
and one with 4x that training (40 epochs of 50,000), the reference for "more training".
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "persistence"
STOP = threading.Event()  # set on Ctrl-C / SIGINT: no point starts its next lr
ATTACKS = ("badnets", "blend")
LRS = ("0.03", "0.01")
STEP = {"schedule": "step", "lr": "0.1"}
SUBSET = {"train_limit": "12500", "clean_share": "0.2"}  # 2,500 defender images, as 5% of 50,000
# name -> (profile overrides over quick, description)
POINTS = {
    "quick": ({}, "10 epochs x 50k, one-cycle (lr 0.2): the quick profile"),
    "step10": ({**STEP, "milestones": "5,8"}, "10 epochs x 50k, step (lr 0.1, /10 at 5 and 8)"),
    "sub-onecycle40": ({"epochs": "40", **SUBSET}, "40 epochs x 12.5k, one-cycle (lr 0.2)"),
    "sub-step40": ({"epochs": "40", **STEP, "milestones": "20,30", **SUBSET},
                   "40 epochs x 12.5k, step (lr 0.1, /10 at 20 and 30)"),
    "step40": ({"epochs": "40", **STEP, "milestones": "20,30"}, "40 epochs x 50k, step (lr 0.1, /10 at 20 and 30)"),
}


def images_seen(over: dict) -> int:
    return int(over.get("epochs", 10)) * int(over.get("train_limit", 50_000))


def run_point(name: str, bench_args: list[str], tracking_dir: Path | None) -> None:
    over, _ = POINTS[name]
    for lr in LRS:
        if STOP.is_set():
            return
        out = OUT / f"{name}-lr{lr}.json"
        sets = [a for k, v in {**over, "finetune_lr": lr}.items() for a in ("--set", f"profile.{k}={v}")]
        cmd = [sys.executable, "-m", "nadbench.commands.cli", "run", "--profile", "quick", "--attacks", ",".join(ATTACKS),
               "--defenses", "finetune,nad", "--seeds", "0", *sets, "--output", os.path.relpath(out), *bench_args]
        if tracking_dir:  # one store per point: concurrent points never share an SQLite file
            cmd += ["--tracking-uri", f"sqlite:///{(tracking_dir / name).resolve()}.db"]
        print("+", " ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        if code in (130, 143):  # interrupted: it wrote what finished
            STOP.set()
        elif code != 0 and not out.exists():
            print(f"{name} lr {lr}: bench run failed ({code})", file=sys.stderr)
            return


def collect() -> dict:
    """{point: {lr: {attack: {"before": .., "finetune": .., "nad": ..}}}} from the JSON files, in %."""
    data: dict = {}
    for name in POINTS:
        for lr in LRS:
            path = OUT / f"{name}-lr{lr}.json"
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["results"]:
                if r.get("status", "FINISHED") != "FINISHED":
                    continue
                c = r["cell"]
                entry = data.setdefault(name, {}).setdefault(lr, {}).setdefault(c["attack"], {})
                entry["before"] = {m: 100 * r["before"][m] for m in ("asr", "acc")}
                entry[c["defense"]] = {m: 100 * r["after"][m] for m in ("asr", "acc")}
                if "teacher" in r.get("models", {}):  # NAD's teacher, measured by the engine
                    entry["teacher"] = {m: 100 * r["models"]["teacher"][m] for m in ("asr", "acc")}
    return data


def verdict(entry: dict) -> bool | None:
    """The issue's criterion on one Blend (point, lr): FT >= 30 % ASR and NAD < 10 %."""
    if "finetune" not in entry or "nad" not in entry:
        return None
    return entry["finetune"]["asr"] >= 30 and entry["nad"]["asr"] < 10


def render(data: dict, commands: list[str]) -> str:
    def pair(e, k):
        return f"{e[k]['asr']:.2f} / {e[k]['acc']:.2f}" if k in e else "-"

    lines = ["# Persistence study: how much of a backdoor survives finetuning", "",
             "Made by: " + "; ".join(f"`{c}`" for c in commands) + "  ",
             "Each row: one backdoored WRN-16-1 (CIFAR-10, seed 0) and the defenses at one finetuning lr "
             "(`profile.finetune_lr`, the initial lr of finetuning and of NAD's teacher and student). "
             "ASR / ACC in %; ACC on the whole test set. \"Paper-like\": finetuning leaves >= 30 % ASR on "
             "Blend while NAD brings it under 10 %. Images seen = epochs x training images: 500,000 is the "
             "quick profile's cost, 17-20 minutes of backdoor training on the 2-core development CPU "
             "(`time_backdoor_s` of seeds 1 and 2 in table1-quick-badnets-3seeds.json: 1211 s, 1032 s).", ""]
    # NAD's teacher is a column only in results made since the engine measures it.
    teachers = any("teacher" in e for p in data.values() for lr in p.values() for e in lr.values())
    columns = {"before": "backdoored", "finetune": "finetune", "nad": "nad", **({"teacher": "nad's teacher"} if teachers else {})}
    lines += ["| point | backdoor training | images seen | attack | FT lr | " + " | ".join(columns.values()) + " | paper-like |",
              "| --- | --- | ---: | --- | ---: |" + " --- |" * (len(columns) + 1)]
    for name, (over, desc) in POINTS.items():
        for lr in LRS:
            for attack in ATTACKS:
                e = data.get(name, {}).get(lr, {}).get(attack)
                if not e:
                    continue
                v = verdict(e) if attack == "blend" else None
                lines.append(f"| {name} | {desc} | {images_seen(over):,} | {attack} | {lr} | "
                             + " | ".join(pair(e, k) for k in columns) + f" | {'' if v is None else 'yes' if v else 'no'} |")
    missing = [f"{n} lr {lr}" for n in POINTS for lr in LRS if lr not in data.get(n, {})]
    if missing:
        lines += ["", "Not run (or not finished): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, of: {', '.join(POINTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (1 on a CPU: one training job "
                        "at a time; more on a GPU, with --tracking-dir)")
    parser.add_argument("--tracking-dir", type=Path, default=None, help="one SQLite store per point in this folder")
    parser.add_argument("--made-on", default="", help="where it ran, for the results file")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("bench_args", nargs="*", help="passed to every `bench run` (put them after --)")
    args = parser.parse_args()
    points = args.points.split(",")
    unknown = sorted(set(points) - set(POINTS))
    if unknown:
        parser.error(f"unknown point(s) {', '.join(unknown)}; valid: {', '.join(POINTS)}")
    meta = OUT / "made_by.json"
    if not args.render_only:
        OUT.mkdir(parents=True, exist_ok=True)
        if args.tracking_dir:
            args.tracking_dir.mkdir(parents=True, exist_ok=True)
        made = json.loads(meta.read_text()) if meta.exists() else []
        made.append("python benchmarks/persistence.py " + shlex.join(sys.argv[1:])
                    + (f" (on {args.made_on})" if args.made_on else ""))
        meta.write_text(json.dumps(made, indent=1))
        pool = ThreadPoolExecutor(max(1, args.jobs))
        try:
            list(pool.map(lambda p: run_point(p, args.bench_args, args.tracking_dir), points))
        except KeyboardInterrupt:  # the children got the signal too and write what finished
            STOP.set()
            print("interrupted: rendering what finished", file=sys.stderr)
        pool.shutdown(wait=True)
    commands = json.loads(meta.read_text()) if meta.exists() else []
    md = HERE / "results" / "persistence.md"
    data = collect()
    md.write_text(render(data, commands))
    (HERE / "results" / "persistence.json").write_text(json.dumps(data, indent=1))
    print(md.read_text())


if __name__ == "__main__":
    main()
