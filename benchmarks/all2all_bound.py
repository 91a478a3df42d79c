"""Is an all-to-all backdoor's ASR capped by clean accuracy? Split the ASR set of a grid's cached
all-to-all model by whether the model classifies each image correctly without the trigger.

    python benchmarks/all2all_bound.py --attack badnets@all2all --profile quick

Needs the backdoored model in the cache (NADBENCH_CACHE) from a grid of the same profile and
settings; it trains nothing else. Writes benchmarks/results/all2all-bound-<attack>.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from nadbench.engine import Runner, profile
from nadbench.engine.grid import Cell
from nadbench.engine.registry import get_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", default="badnets@all2all")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--model", default="wrn-16-1")
    args = parser.parse_args()
    runner = Runner(get_registry(), profile(args.profile), device=torch.device("cpu"),
                    data_root=os.environ.get("NADBENCH_DATA_ROOT"), progress=False)
    cell = Cell(args.dataset, args.attack, "finetune", args.model, args.model, 0, "", None)
    trained, armed = runner.backdoored(cell), runner.armed(cell)
    test = runner.data(args.dataset)[2]
    if len(armed.triggered) != len(test):
        raise SystemExit("the ASR set is not the whole test set (an all-to-one attack?)")
    with torch.no_grad():
        def predict(images):
            return torch.cat([trained.model(images[i:i + 500].float() / 255).argmax(1) for i in range(0, len(images), 500)])
        right = predict(test.images) == test.labels
        hit = predict(armed.triggered.images) == armed.targets
    rows = [("all test images", hit), ("classified right when clean", hit[right]), ("classified wrong when clean", hit[~right])]
    lines = [f"# All-to-all ASR against clean accuracy: `{args.attack}`, profile `{args.profile}`", "",
             f"Made by: `python benchmarks/all2all_bound.py --attack {args.attack} --profile {args.profile}` "
             f"(the cached model of `bench run --attacks {args.attack} --profile {args.profile}`, seed 0, {args.model}, "
             f"{'cache hit' if trained.hit else 'trained here'})", "",
             f"Clean ACC of the backdoored model: {100 * float(right.float().mean()):.2f} %", "",
             "| triggered test images | n | ASR (sent to y + 1) in % |", "| --- | --- | --- |"]
    lines += [f"| {name} | {len(h)} | {100 * float(h.float().mean()):.2f} |" for name, h in rows]
    out = Path(__file__).resolve().parent / "results" / f"all2all-bound-{args.attack.replace('@', '-')}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
