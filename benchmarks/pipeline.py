"""Wall times of the grid pipeline on this machine: one grid serial (in-process, with torch's
default threads and with ``--threads T``) and under ``--workers N`` (T threads each), each from an
empty cache and store, then a rerun of the finished grid (resume: nothing is recomputed). Checks
that serial and workers give the same ACC/ASR at the same thread count. Writes
benchmarks/results/pipeline.md with the commands and the machine.

    python benchmarks/pipeline.py [--workers 2] [--threads 1] -- [extra bench run arguments]

Run it alone: two jobs on one 2-core machine slow each other 3-5x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = ["--attacks", "badnets", "--defenses", "finetune,nad", "--teachers", "wrn-16-1,wrn-16-2",
        "--no-progress", "--set", "profile.train_limit=3000", "--set", "profile.test_limit=1000",
        "--set", "profile.epochs=2", "--set", "nad.epochs=3", "--set", "nad.teacher_epochs=3",
        "--set", "finetune.epochs=3"]


def bench(folder: Path, args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "NADBENCH_CACHE": str(folder / "cache")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nadbench.commands.cli", "run", *args, "--output", "out.json"], cwd=folder,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((folder / "out.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per cell, in every mode")
    parser.add_argument("extra", nargs="*", help="more `bench run` arguments (after --)")
    opts = parser.parse_args()
    grid = [*GRID, *opts.extra]
    pinned = [*grid, "--threads", str(opts.threads)]
    modes = [("serial, torch's default threads", grid), (f"serial, --threads {opts.threads}", pinned),
             (f"--workers {opts.workers} --threads {opts.threads}", [*pinned, "--workers", str(opts.workers)])]
    rows, numbers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, args) in enumerate(modes):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            wall, out = bench(folder, args)
            rows.append((name, "empty cache and store", wall))
            numbers[name] = {r["cell"]["defense"] + "/" + r["cell"]["teacher"]: (r["after"]["acc"], r["after"]["asr"])
                             for r in out["results"]}
            if i == 0:
                wall, out = bench(folder, args)
                assert all(r.get("reused_from") for r in out["results"])
                rows.append((name, "rerun of the finished grid (every cell reused)", wall))
    numbers.pop(modes[0][0])  # another thread count: other numbers, by design
    same = len({json.dumps(v, sort_keys=True) for v in numbers.values()}) == 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    lines = ["# Grid pipeline: serial vs worker processes, and resume", "",
             f"Command: `python benchmarks/pipeline.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`  ",
             f"Grid: `bench run {' '.join(shlex.quote(a) for a in grid)}` (3 cells: finetune; NAD with "
             "the WRN-16-1 model itself and with a supplied WRN-16-2 as teacher)  ",
             f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}", "",
             "| mode | state | wall time (s) |", "| --- | --- | ---: |"]
    lines += [f"| {m} | {s} | {w:.1f} |" for m, s, w in rows]
    lines += ["", f"Same ACC/ASR serial and in workers at {opts.threads} thread(s) per cell: {'yes' if same else 'NO'}",
              "", "| cell | ACC after | ASR after |",
              "| --- | ---: | ---: |"]
    first = next(iter(numbers.values()))
    lines += [f"| {k} | {100 * v[0]:.2f} | {100 * v[1]:.2f} |" for k, v in first.items()]
    out = HERE / "results" / "pipeline.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
