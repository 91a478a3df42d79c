"""The `quick` profile's finetuning learning rate, chosen without the test set (issue 41, item 1).

    python benchmarks/quick_lr.py                 # trains; writes benchmarks/results/quick-lr-validation.{json,md}
    python benchmarks/quick_lr.py --render-only   # re-renders the markdown from the JSON

**The procedure, fixed before any number was seen.** CIFAR-10's training set is split once (seed 0)
into a validation split of VAL_SIZE images and the rest; the test set is never read. On the rest, the
engine backdoors the profile's sizing attack (BadNets, its defaults) with the `quick` profile, on
seeds SEEDS, which no committed result reports (those use 0-2), and defends it with each of the
defenses that take the profile's `finetune_lr` (finetuning and NAD, the profile's sizing pair) at
each candidate lr in CANDIDATES, everything else at its defaults (the grid's 5 % clean share, drawn
from the rest). Each is measured on the validation split, clean (ACC) and carrying the attack's
trigger (ASR). **The rule**: the candidate with the highest mean validation DER (BackdoorBench's
defense effectiveness rating, which rewards the ASR removed and charges the ACC lost) over the
defenses and seeds; a tie goes to the lower lr. `tests/test_config.py` checks that the profile's
`finetune_lr` is the value the committed results file names.

Run it alone (it trains: one backdoored model per seed, then two defenses per candidate).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quick-lr-validation"
CANDIDATES = (0.01, 0.02, 0.03, 0.05, 0.1)
DEFENSES = ("finetune", "nad")
SEEDS = (10, 11)
VAL_SIZE = 5000
DATASET = "cifar10-validation"


def chosen(path: Path = RESULTS.with_suffix(".json")) -> float:
    """The lr the committed procedure chose (what the profile must hold)."""
    return json.loads(path.read_text())["chosen_lr"]


def _registry():
    """The installed plugins and CIFAR-10 split into (the rest, the validation split) as a dataset."""
    from nadbench import DatasetSpec, hookimpl
    import torch

    from nadbench.engine.registry import PluginInfo, Registry

    reg = Registry()
    reg.load_entrypoints()
    cifar = reg.dataset("cifar10")

    def load(root):
        train, _ = cifar.load(root)  # the test split is not used
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        return train.subset(order[VAL_SIZE:].sort().values), train.subset(order[:VAL_SIZE].sort().values)

    spec = DatasetSpec(DATASET, load, cifar.num_classes, cifar.mean, cifar.std,
                       description="CIFAR-10's training set less a validation split, and that split")
    module = types.ModuleType("quick_lr_validation")
    module.register_datasets = hookimpl(lambda register: register(spec))
    info = PluginInfo("quick-lr", "quick_lr_validation", "benchmarks 0")
    reg.add_plugin(module, info)
    if info.error:
        raise SystemExit(info.traceback)
    return reg


def measure(data_root: Path | None) -> list[dict]:
    from nadbench.engine.grid import profile
    from nadbench.engine.runner import Runner, expand

    reg, rows = _registry(), []
    for lr in CANDIDATES:
        over = {d: {"lr": str(lr)} for d in DEFENSES}
        runner = Runner(reg, profile("quick"), data_root=data_root, overrides=over, progress=False)
        for cell in expand(reg, [DATASET], ["badnets"], list(DEFENSES), ["wrn-16-1"], None, list(SEEDS)):
            start = time.perf_counter()
            r = runner.run_cell(cell)
            rows.append({"lr": lr, "seed": cell.seed, "defense": cell.defense, "before": r["before"],
                         "after": r["after"], "time_s": time.perf_counter() - start})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def choose(rows: list[dict]) -> tuple[float, dict[float, float]]:
    from nadbench.training.evaluate import defense_effectiveness

    der = {lr: statistics.fmean(defense_effectiveness(r["before"], r["after"]) for r in rows if r["lr"] == lr)
           for lr in CANDIDATES}
    best = max(der.values())
    return min(lr for lr, d in der.items() if d == best), der


def render(data: dict) -> str:
    rows, der = data["rows"], {float(k): v for k, v in data["der"].items()}
    lines = ["# The `quick` profile's finetuning learning rate, chosen on a validation split", "",
             f"Made by: `{data['command']}` at commit {data['commit']}, {data['machine']}"
             + (f", {data['cpu']}" if data.get("cpu") else "") + f", run alone; wall time {data['wall_s'] / 60:.0f} "
             "min." + (f" {data['note']}" if data.get("note") else ""), "",
             f"CIFAR-10's training set less a validation split of {VAL_SIZE} of its images (the test set unread); "
             f"BadNets, WRN-16-1, `quick` profile, seeds {', '.join(map(str, SEEDS))} (no committed result reports "
             "them); finetuning and NAD at each candidate lr, everything else at the defaults. The rule, fixed before "
             "the runs (benchmarks/quick_lr.py): the highest mean validation DER over defenses and seeds, a tie "
             "going to the lower lr.", "",
             "Validation ASR / ACC in %, and DER, per defense and seed:", "",
             "| lr | " + " | ".join(f"{d} s{s}" for s in SEEDS for d in DEFENSES) + " | mean DER |",
             "| --- |" + " --- |" * (len(SEEDS) * len(DEFENSES) + 1)]
    from nadbench.training.evaluate import defense_effectiveness

    for lr in CANDIDATES:
        cells = []
        for seed in SEEDS:
            for d in DEFENSES:
                r = next(r for r in rows if r["lr"] == lr and r["seed"] == seed and r["defense"] == d)
                cells.append(f"{100 * r['after']['asr']:.2f} / {100 * r['after']['acc']:.2f} "
                             f"({defense_effectiveness(r['before'], r['after']):.3f})")
        mark = " **chosen**" if lr == data["chosen_lr"] else ""
        lines.append(f"| {lr:g}{mark} | " + " | ".join(cells) + f" | {der[lr]:.4f} |")
    before = {s: next(r["before"] for r in rows if r["seed"] == s) for s in SEEDS}
    lines += ["", "Before any defense: " + "; ".join(
        f"seed {s}: ASR {100 * b['asr']:.2f}, ACC {100 * b['acc']:.2f}" for s, b in before.items()) + ".", "",
        f"Chosen: **{data['chosen_lr']:g}**, the `quick` profile's `finetune_lr` (core/engine/grid.py; "
        "tests/test_config.py reads it from this file's JSON)."]
    runner_up = sorted(der, key=der.get)[-2]
    lines += ["", f"The runner-up, {runner_up:g}, is {der[data['chosen_lr']] - der[runner_up]:.4f} DER behind: "
              "the rule's choice between them is narrow."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from table1 import _machine

    if not args.render_only:
        import subprocess

        start = time.perf_counter()
        rows = measure(args.data_root)
        lr, der = choose(rows)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        data = {"command": "python benchmarks/quick_lr.py", "commit": commit, "machine": _machine(),
                "wall_s": time.perf_counter() - start, "candidates": CANDIDATES, "seeds": SEEDS,
                "defenses": DEFENSES, "val_size": VAL_SIZE, "rows": rows, "der": der, "chosen_lr": lr}
        RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    data = json.loads(RESULTS.with_suffix(".json").read_text())
    RESULTS.with_suffix(".md").write_text(render(data))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
