"""The trained outcomes the test suite bounds, at three seeds, on this CPU: what every bound must lie
beyond (tests/conftest.py states the rule).

    python benchmarks/test_margins.py [--seeds 0,1,2] [--record FILE] [-- PYTEST ARGS]

runs the suite's `seeded` tests (those whose verdict is a trained outcome; each takes the seed of its
randomness from ``NADBENCH_TEST_SEED``) once per seed in float32, collects what each test recorded
(the ``record`` fixture) and writes benchmarks/results/test-margins-<cpu kind>.md: per test and
quantity, the value at each seed and the worst. A failing test is listed too, with its values: a
bound that a seed crosses is what this run is for. ``--record FILE`` keeps the measurements in FILE
and adds to it, so that a test changed later is measured again alone (``-- -k NAME``) and the table
shows each test's latest values, with every command that went into it (``--table-only`` rewrites the
table from FILE, for lines added from another record). Needs
``NADBENCH_DATA_ROOT``; run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_kind() -> tuple[str, str]:
    """(a slug for the file name, the CPU's model name and bf16 features)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    if "amx_bf16" in flags:
        slug, features = "amx", "AVX512-BF16 + AMX"
    elif "avx512_bf16" in flags:
        slug, features = "avx512bf16", "AVX512-BF16"
    else:
        slug, features = "avx2", "no native bf16"
    vendor = "intel" if "Intel" in model else "amd" if "AMD" in model else "cpu"
    return f"{vendor}-{slug}", f"{model} ({features})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--record", type=Path, help="JSON-lines file to add the measurements to (default: a new one)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite the table from --record (after lines were added to it by hand)")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k anp)")
    args = parser.parse_args()
    if args.table_only and not args.record:
        parser.error("--table-only reads --record FILE")
    seeds = [int(s) for s in args.seeds.split(",")]
    record = args.record or Path(tempfile.mkdtemp()) / "record.jsonl"
    if not args.table_only:
        measure(args, seeds, record)
    write_table(record)


def measure(args, seeds: list[int], record: Path) -> None:
    """Run the `seeded` tests once per seed, each appending what it recorded to ``record``; then the command."""
    command = shlex.join(["python", "benchmarks/test_margins.py", "--seeds", args.seeds]
                         + (["--record", args.record.name] if args.record else [])
                         + (["--", *args.pytest_args] if args.pytest_args else []))
    outcomes: dict[int, int] = {}
    start = time.perf_counter()
    for seed in seeds:
        env = {**os.environ, "NADBENCH_TEST_SEED": str(seed), "NADBENCH_TEST_RECORD": str(record)}
        cmd = [sys.executable, "-m", "pytest", "-m", "seeded", "-q", "-p", "no:cacheprovider", *args.pytest_args]
        print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
        outcomes[seed] = subprocess.run(cmd, cwd=HERE.parent, env=env).returncode
    minutes = (time.perf_counter() - start) / 60
    with open(record, "a") as f:
        f.write(json.dumps({"command": command, "minutes": round(minutes, 1), "exit_codes": outcomes}) + "\n")


def write_table(record: Path) -> None:
    """benchmarks/results/test-margins-<cpu kind>.md from every line of ``record``."""
    values: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    runs = []
    for line in record.read_text().splitlines():
        row = json.loads(line)
        if "command" in row:
            runs.append(row)
            continue
        test, seed = row.pop("test"), row.pop("seed")
        for key, value in row.items():
            values[(test, key)][seed] = value  # a later measurement of the same test replaces it
    seeds = sorted({s for by_seed in values.values() for s in by_seed})
    slug, kind = cpu_kind()
    lines = [f"# The suite's trained outcomes at seeds {', '.join(map(str, seeds))}, float32", "",
             f"CPU: {kind}, {os.cpu_count()} cores. Made by, in this order (a later run's values replace "
             "an earlier run's for the tests it ran):", "",
             *[f"- `{r['command']}` ({r['minutes']} min; pytest exit codes "
               + ", ".join(f"seed {s}: {c}" for s, c in r["exit_codes"].items()) + ")" for r in runs], "",
             "Each bound in the suite lies beyond the worst of these (tests/conftest.py). Values are shares "
             "(ASR, ACC) unless the name says otherwise; the bf16-marked test ran under `auto`.", "",
             "| test | quantity | " + " | ".join(f"seed {s}" for s in seeds) + " | min | max |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |"]
    for (test, key), by_seed in sorted(values.items()):
        got = [by_seed[s] for s in seeds if s in by_seed]
        cells = " | ".join(f"{by_seed[s]:.4g}" if s in by_seed else "—" for s in seeds)
        lines.append(f"| `{test.split('/')[-1]}` | {key} | {cells} | {min(got):.4g} | {max(got):.4g} |")
    out = HERE / "results" / f"test-margins-{slug}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
