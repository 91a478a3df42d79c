"""Is the stegastamp attack's trigger (SSBA's generator) sample-specific, as SSBA's must be? On the
default encoder: residual correlation, and ASR with each image's own residual against ASR with the
mean one.

    python benchmarks/ssba_specificity.py --profile quick

Takes the grid's poisoning and backdoored model of (CIFAR-10, WRN-16-1, seed 0) from the cache
(NADBENCH_CACHE), or makes them as `bench run --attacks stegastamp` does, then measures on the ASR
set (the non-target test images): the mean Pearson correlation of two images' residuals over the first 100
(a fixed pattern gives 1), and the ASR with each image's own residual, with another image's (the
next one's), and with the mean residual of the whole set added to every image. A sample-specific
trigger needs its own residual: its ASR exceeds the mean residual's. Writes
benchmarks/results/ssba-specificity-<profile>.md. Run it alone.
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from nadbench.engine import Runner, profile
from nadbench.engine.grid import Cell
from nadbench.engine.registry import get_registry
from nadbench.training.train import precision


def mean_pairwise_correlation(residuals: torch.Tensor) -> float:
    """Mean Pearson correlation over all pairs of distinct rows of (n, ...) residuals."""
    flat = residuals.flatten(1).double()
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    corr = flat @ flat.T
    n = len(flat)
    return float((corr.sum() - corr.diagonal().sum()) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--attack", default="stegastamp", help="the attack or one of its variants")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    runner = Runner(get_registry(), profile(args.profile), device=cpu,
                    data_root=os.environ.get("NADBENCH_DATA_ROOT"), progress=True)
    cell = Cell("cifar10", args.attack, "finetune", "wrn-16-1", "wrn-16-1", 0, "", None)
    trained, armed = runner.backdoored(cell), runner.armed(cell)
    attack, asr_set = armed.attack, armed.triggered
    _, _, test = runner.data("cifar10")
    clean = test.images[attack.targets(test.labels) != test.labels]  # the ASR set before its trigger
    residual = asr_set.images.float() - clean.float()

    def asr(images: torch.Tensor) -> float:
        with torch.no_grad():
            pred = torch.cat([trained.model(images[i:i + 500].float() / 255).argmax(1)
                              for i in range(0, len(images), 500)])
        return 100 * float((pred == armed.targets).float().mean())

    def added(r: torch.Tensor) -> torch.Tensor:
        return (clean.float() + r).round().clamp(0, 255).to(torch.uint8)

    rows = [("its own residual (the attack)", asr(asr_set.images)),
            ("the next image's residual", asr(added(residual.roll(1, 0)))),
            ("the mean residual of the set", asr(added(residual.mean(0, keepdim=True)))),
            ("no trigger", asr(clean))]
    corr = mean_pairwise_correlation(residual[:100])
    c = attack.config
    lines = [f"# SSBA: is the trigger sample-specific? Profile `{args.profile}`", "",
             f"Made by: `python benchmarks/ssba_specificity.py --profile {args.profile} --attack {args.attack}` "
             f"(the model and poisoning of `bench run --attacks {args.attack} --profile {args.profile}`, CIFAR-10, "
             f"WRN-16-1, seed 0, {'cache hit' if trained.hit else 'trained here'})  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, precision {precision(cpu)}", "",
             f"Encoder: {c.bits} bits, {c.encoder_images} images, {c.encoder_epochs} epochs, bound {c.bound:g} levels; "
             f"string read back {100 * attack.bit_accuracy:.1f} % at {attack.psnr:.1f} dB PSNR (held-out training images).",
             "", f"Mean pairwise correlation of the residuals of the first 100 ASR-set images: **{corr:.3f}** "
             "(a fixed pattern: 1.000).", "",
             f"ASR over the {len(clean)} non-target test images, each image given:", "",
             "| trigger | ASR (%) |", "| --- | --- |", *[f"| {name} | {value:.2f} |" for name, value in rows], "",
             f"Own minus mean residual: **{rows[0][1] - rows[2][1]:+.2f}** points."]
    out = Path(__file__).resolve().parent / "results" / f"ssba-specificity-{args.profile}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
