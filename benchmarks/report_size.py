"""How large `bench report`'s page of a 30-cell grid is, and how long headless Chromium takes to open it.

    python benchmarks/report_size.py        # writes benchmarks/results/report-size.md

Runs a 30-cell grid on small CIFAR-10 subsets (BadNets x five defenses x six seeds; the numbers do not
matter here, the page's size and load do), writes its report, and times Chromium's `--dump-dom` of
the page against the same of an empty page, in one run (the difference is the page's own cost: its
parsing, its inlined images, its script). Run it alone.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFENSES = "finetune,fine-pruning,nad,clp,fst"
SEEDS = "0,1,2,3,4,5"
SETS = ("profile.train_limit=500", "profile.test_limit=200", "profile.epochs=1")
REPS = 5


def _bench(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", *args], cwd=cwd, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return out


def _open_s(browser: str, page: Path) -> float:
    start = time.perf_counter()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--dump-dom", page.as_uri()], capture_output=True, check=True, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp}/nadbench.db"
        grid = ["run", "--attacks", "badnets", "--defenses", DEFENSES, "--seeds", SEEDS, "--no-progress",
                "--tracking-uri", uri, *[a for s in SETS for a in ("--set", s)]]
        start = time.perf_counter()
        _bench(*grid, cwd=tmp)
        grid_s = time.perf_counter() - start
        start = time.perf_counter()
        _bench("report", "--tracking-uri", uri, "--output", str(tmp / "report.html"), cwd=tmp)
        report_s = time.perf_counter() - start
        page, blank = tmp / "report.html", tmp / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body></body></html>")
        _open_s(browser, blank)  # a first start warms the browser's files
        pairs = [(_open_s(browser, page), _open_s(browser, blank)) for _ in range(REPS)]
        size = page.stat().st_size
        cells = page.read_text().count("<details>")
    own = statistics.median(p - b for p, b in pairs)
    lines = ["# `bench report`: a 30-cell grid's page, its size and its opening time", "",
             "Made by: `python benchmarks/report_size.py`, run alone; CPU "
             f"{_cpu()}, {os.cpu_count()} cores; {subprocess.run([browser, '--version'], capture_output=True, text=True).stdout.strip()}.", "",
             f"Grid: `bench run --attacks badnets --defenses {DEFENSES} --seeds {SEEDS} --set {' --set '.join(SETS)}` "
             f"({grid_s / 60:.1f} min), "
             f"then `bench report` ({report_s:.1f} s, reading the store and drawing the charts).", "",
             "| | value |", "| --- | --- |",
             f"| cells on the page | {cells} |",
             f"| page size | {size / 1e6:.2f} MB |",
             f"| headless Chromium `--dump-dom`, the page (median of {REPS}) | "
             f"{statistics.median(p for p, _ in pairs):.2f} s |",
             f"| the same, an empty page | {statistics.median(b for _, b in pairs):.2f} s |",
             f"| the page's own cost (median of the paired differences) | {own:.2f} s |", "",
             "The browser's own start dominates the command's time; the page's cost is the difference."]
    out = HERE / "results" / "report-size.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
