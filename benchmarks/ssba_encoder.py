"""The stegastamp attack's encoder (SSBA's generator) as the attack trains it in a grid: bit accuracy
and PSNR.

    python benchmarks/ssba_encoder.py --epochs 8,16

runs the attack's ``prepare`` on the whole CIFAR-10 training set (as the poison stage does, seed 0) once per
``encoder_epochs`` value, and measures on the 1,000 training images the encoder did not see: the share
of the attack's string read back, the same for random strings, and the PSNR of the encoded images.
Writes benchmarks/results/ssba-encoder.md. Run it alone: the times are wall times on this machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from nadbench import AttackContext
from nadbench.plugins.attacks.stegastamp import StegaStampResidual as SSBA
from nadbench.engine.registry import get_registry
from nadbench.toolkit.stegastamp import bit_accuracy
from nadbench.training.train import precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="16", help="comma-separated encoder_epochs values")
    args = parser.parse_args()
    spec = get_registry().dataset("cifar10")
    train, _ = spec.load(os.environ.get("NADBENCH_DATA_ROOT"))
    cpu = torch.device("cpu")
    rows = []
    for epochs in (int(e) for e in args.epochs.split(",")):
        attack = SSBA(SSBA.Config(encoder_epochs=epochs))
        start = time.perf_counter()
        attack.prepare(AttackContext(dataset=spec, train=train, device=cpu, seed=0, progress=False))
        seconds = time.perf_counter() - start
        # the held-out images prepare measured on: the 1,000 after the encoder's share of its permutation
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        held_out = train.images[order[attack.config.encoder_images:attack.config.encoder_images + 1000]]
        strings = torch.randint(0, 2, (len(held_out), attack.config.bits), generator=torch.Generator().manual_seed(1))
        random_acc, _ = bit_accuracy(attack.net, held_out, strings)
        rows.append(f"| {epochs} | {seconds:.0f} | {100 * attack.bit_accuracy:.1f} | {100 * random_acc:.1f} | {attack.psnr:.1f} |")
        print(rows[-1], flush=True)
    c = SSBA.Config()
    lines = ["# SSBA's StegaStamp encoder, as the attack trains it", "",
             f"Made by: `python benchmarks/ssba_encoder.py --epochs {args.epochs}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, precision {precision(cpu)}, alone on the machine", "",
             f"CIFAR-10, seed 0; {c.bits} bits, {c.encoder_images} training images, bound {c.bound:g} levels, Adam 1e-3 "
             "cosine; measured on the 1,000 training images after the encoder's share (not seen in training).", "",
             "| encoder epochs | seconds | attack's string read back (%) | random strings (%) | PSNR (dB) |",
             "| --- | --- | --- | --- | --- |", *rows]
    out = Path(__file__).resolve().parent / "results" / "ssba-encoder.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
