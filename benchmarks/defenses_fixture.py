"""Defenses on the test suite's BadNets fixture at settings too slow for the suite: the figures the
ANP, Neural Cleanse and I-BAU docstrings quote.

    python benchmarks/defenses_fixture.py

repairs ``tests/fixtures/badnets-wrn16-1.safetensors`` with 1,000 of the clean training images it saw
and measures it on 1,000 test images (the data of tests/test_defenses_e2e.py), once per setting below.
Writes benchmarks/results/defenses-fixture.md. Needs ``NADBENCH_DATA_ROOT``; run it alone: the times
are wall times on this machine.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

import test_defenses_e2e as e2e  # noqa: E402 — the suite's own data and defense runner
from conftest import real_subset  # noqa: E402
from nadbench.engine.registry import get_registry  # noqa: E402
from nadbench.training.train import precision  # noqa: E402

SETTINGS = [
    ("anp", {"iterations": 1000, "rule": "threshold"}),
    ("anp", {"iterations": 500}),
    ("anp", {"iterations": 500, "eps": 0.1}),
    ("neural-cleanse", {"epochs": 5, "unlearn_epochs": 10}),
    ("neural-cleanse", {"epochs": 20, "unlearn_epochs": 10}),
    ("i-bau", {"rounds": 2}),
    ("i-bau", {}),
]
SHOWN = ("anp.threshold", "anp.pruned", "anp.pruned_ratio", "nc.flagged")


def main() -> None:
    clean, test = real_subset(1000, 1000)
    data = (clean, test, get_registry().attack("badnets")().trigger_test(test))
    lines = ["# Defenses on the BadNets test fixture", "",
             "Made by: `python benchmarks/defenses_fixture.py`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; precision {precision(torch.device('cpu'))}; "
             "WRN-16-1 fixture (8 epochs on 20,000 images), 1,000 clean images, 1,000 test images.", "",
             "| defense | settings | ASR before | ACC before | ASR after | ACC after | s | logged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, over in SETTINGS:
        start = time.perf_counter()
        _, before, after, logged = e2e._defend(name, data, **over)
        seconds = time.perf_counter() - start
        shown = {k: [round(v, 3) for v in logged[k]] for k in SHOWN if k in logged}
        if "nc.anomaly_index" in logged:
            shown["nc.anomaly_index"] = [round(v, 1) for v in logged["nc.anomaly_index"]]
        lines.append(f"| {name} | {over or 'defaults'} | {100 * before['asr']:.1f} | {100 * before['acc']:.1f} | "
                     f"{100 * after['asr']:.1f} | {100 * after['acc']:.1f} | {seconds:.0f} | {shown} |")
        print(lines[-1], flush=True)
    out = HERE / "results" / "defenses-fixture.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
