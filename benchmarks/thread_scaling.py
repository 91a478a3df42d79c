"""One epoch of 60 WRN-16-1 steps (batch 64, crop and flip) on the CPU with N torch threads: the
measurement behind running the test suite as one-thread xdist workers (tests/conftest.py).

    python benchmarks/thread_scaling.py 2; python benchmarks/thread_scaling.py 1
    python benchmarks/thread_scaling.py 1 & python benchmarks/thread_scaling.py 1; wait   # two at once

Results: benchmarks/results/suite-time.md ("One-thread workers").
"""
import sys
import time

import torch

from nadbench import Split
from nadbench.training.models import build
from nadbench.engine.registry import get_registry
from nadbench.training.train import Optim, train

if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    reg = get_registry()
    torch.manual_seed(0)
    model = build(reg.model("wrn-16-1"), reg.dataset("cifar10"), torch.device("cpu"))
    data = Split(torch.randint(0, 256, (64 * 60, 3, 32, 32), dtype=torch.uint8), torch.arange(64 * 60) % 10)
    start = time.perf_counter()
    train(model, data, Optim(epochs=1, lr=0.01, batch_size=64, crop=4, flip=True), seed=0, progress=False)
    print(f"{threads} thread(s): {time.perf_counter() - start:.2f} s")
