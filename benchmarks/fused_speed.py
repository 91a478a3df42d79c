"""Training throughput of fused models (nadbench.training.fused) against one model trained alone.

    python benchmarks/fused_speed.py --device cpu --models 1,2,4 --precision float32
    python benchmarks/fused_speed.py --device cuda --models 1,2,4,7,14 --precision float32,bf16

times, per precision, ``nadbench.training.train.train`` on one WRN-16-1 (the eager loop: channels-last on the
CPU, as a grid trains) and ``nadbench.training.fused.train_fused`` on N of them, each model on its own
CIFAR-shaped uint8 data on the device (random: speed does not depend on the pixels), with the
profile's batch 64, crop and flip. Eager and fused runs alternate, ``--reps`` times; the medians give
images per second over all models and the ratio to one model alone. Writes
benchmarks/results/fused-speed-<device type>.md and .json (or to ``--out``). Run it alone.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nadbench import DatasetSpec, Split, settings
from nadbench.training.fused import train_fused
from nadbench.training.models import build
from nadbench.engine.registry import get_registry
from nadbench.training.train import Optim, train

HERE = Path(__file__).resolve().parent
CIFAR = DatasetSpec("cifar-shaped", None, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(arch: str, n: int, device: torch.device) -> list[torch.nn.Module]:
    spec = get_registry().model(arch)
    return [build(spec, CIFAR, device) for _ in range(n)]


def _data(n_models: int, images: int, device: torch.device) -> list[Split]:
    g = torch.Generator().manual_seed(0)
    return [Split(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
                  torch.randint(0, 10, (images,), generator=g).to(device)) for _ in range(n_models)]


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="wrn-16-1")
    parser.add_argument("--models", default="1,2,4", help="numbers of fused models (comma-separated)")
    parser.add_argument("--precision", default="float32", help="float32, bf16 or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timing")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    counts = [int(n) for n in args.models.split(",")]
    opt = Optim(epochs=1, lr=0.1, batch_size=64, crop=4, flip=True)
    images = args.steps * opt.batch_size
    rows = []
    for prec in args.precision.split(","):
        settings.set_default(settings.RunSettings(precision=prec))
        alone, data = _models(args.arch, 1, device), _data(max(counts), images, device)
        train(alone[0], data[0], opt, seed=0, progress=False)  # warm-up: kernels, allocator
        times: dict[int, list[float]] = {0: []}
        for n in counts:
            models = _models(args.arch, n, device)
            train_fused(models, data[:n], opt, seeds=list(range(n)), progress=False)  # warm-up
            times[n] = []
        for _ in range(args.reps):  # alternate, so that drift in the machine's speed hits every variant
            times[0].append(timed(lambda: train(alone[0], data[0], opt, seed=0, progress=False), device))
            for n in counts:
                models = _models(args.arch, n, device)
                times[n].append(timed(lambda: train_fused(models, data[:n], opt, seeds=list(range(n)),
                                                          progress=False), device))
        one = images / statistics.median(times[0])
        rows.append({"precision": prec, "variant": "one model, eager (train)", "models": 1, "img_s": one, "ratio": 1.0})
        for n in counts:
            rate = n * images / statistics.median(times[n])
            rows.append({"precision": prec, "variant": f"{n} fused", "models": n, "img_s": rate, "ratio": rate / one})
        for row in rows[-len(counts) - 1:]:
            print(f"{prec:8s} {row['variant']:28s} {row['img_s']:9.0f} img/s  x{row['ratio']:.2f}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    command = "python benchmarks/fused_speed.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "arch": args.arch, "steps": args.steps, "reps": args.reps, "batch": opt.batch_size}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"fused-speed-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Fused training speed on {name}", "",
             f"Command: `{command}`  ",
             f"torch {torch.__version__}, {meta['threads']} threads; {args.arch}, batch 64, crop and flip, "
             f"{args.steps} steps per timing, medians of {args.reps} alternating repetitions. Images/s count "
             "every model's images; the ratio is over one model trained alone by the eager loop.", "",
             "| precision | variant | img/s | × one model |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['precision']} | {r['variant']} | {r['img_s']:.0f} | {r['ratio']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md", flush=True)


if __name__ == "__main__":
    main()
