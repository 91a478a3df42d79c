"""Fused training: several models of one architecture and schedule trained as one, in one process
(horizontal fusion, Wang et al., HFTA, MLSys 2021). ``bench run --fused`` trains a grid's backdoored
and clean models this way before its cells run (the cells then find them stored).

The small networks of this benchmark are launch-bound on a GPU (WRN-16-1 uses a tiny share of an
H200's peak, benchmarks/results/speed-cuda.md): one stacked step of N models costs about as many
kernel launches as one model's. The models' parameters and buffers are stacked
(``torch.func.stack_module_state``) and one ``vmap``-ed ``functional_call`` runs them all per step:
torch's batching rule turns the stacked convolutions into one grouped convolution.

Each model keeps exactly what :func:`nadbench.training.train.train` would give it alone: its own data and
seed (its own generator draws its batch order and augmentation, in the loop's order), its own
batch-norm statistics (the stacked buffers are updated in place per model), and the loss is the
*sum* over models of each model's mean cross-entropy, so each model's gradient is its own and no
learning rate is divided by N. The optimisers are elementwise (SGD, Adam), so one optimiser over the
stacked parameters is N exact optimisers. Only plain cross-entropy steps fuse; a model with random layers (dropout) draws
different randomness than alone (``vmap(randomness="different")``). The fused path runs NCHW
(no channels-last) and uncompiled; which models fused is in their train keys (``Keys.train``).

Why a loop beside :func:`nadbench.training.train.train` and not that loop over a stacked model: a fused step
draws N batches from N training sets with N generators and runs one ``vmap``-ed functional call over
stacked parameters, while every hook of the one loop's :class:`~nadbench.training.train.Step` (a batch, a loss,
an update, side networks, entries held at zero) is one model's and has no stacked form. What the two
share: the :class:`~nadbench.training.train.Optim` (its optimiser, ``build`` and schedule, ``set_lr``), the
batched augmentation, the precision's autocast and the order of draws (a permutation per epoch, then
each step's augmentation) that makes each fused model the one trained alone (tests/test_fused.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from ..contract.api import Split
from .augment import augment, to_float
from .train import Optim, _autocast, precision


def train_fused(models: list[nn.Module], datas: list[Split], opt: Optim, *, seeds: list[int],
                desc: str = "train fused", progress: bool = True, reduction: str = "sum",
                on_epoch: Callable[[int, list[float]], None] | None = None) -> list[nn.Module]:
    """Train ``models`` (one architecture, on one device) in place, model i on ``datas[i]`` with seed
    ``seeds[i]``, as ``train(models[i], datas[i], opt, seed=seeds[i])`` would with a plain step;
    return them in eval mode. ``on_epoch(epoch, per-model mean losses)`` after every epoch.
    ``reduction="mean"`` divides every model's gradient by N: it exists to show that test fail."""
    if not (len(models) == len(datas) == len(seeds)) or not models:
        raise ValueError("train_fused takes as many models, datasets and seeds, at least one of each")
    sizes = {len(d) for d in datas}
    if len(sizes) != 1:
        raise ValueError(f"fused models need training sets of one size; got {sorted(sizes)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}; valid: sum, mean")
    device = next(models[0].parameters()).device
    bf16 = precision(device) == "bf16"
    for m in models:
        m.train()
    params, buffers = stack_module_state(models)  # copies: written back at the end
    base = copy.deepcopy(models[0]).to("meta")    # the architecture, without storage

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))
    stacked = vmap(forward, randomness="different")
    torch.set_flush_denormal(True)  # as train(): denormal gradients slow CPU kernels
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    optimizer = opt.build(list(params.values()))
    n = sizes.pop()
    steps_per_epoch = math.ceil(n / opt.batch_size)
    bar = tqdm(total=opt.epochs * steps_per_epoch, desc=f"{desc} ({len(models)} models)", disable=not progress,
               leave=False, unit="batch", dynamic_ncols=True)
    with bar:
        for epoch in range(opt.epochs):
            orders = [torch.randperm(n, device=device, generator=g) for g in gens]
            total, seen = torch.zeros(len(models), device=device), 0
            for i in range(steps_per_epoch):
                opt.set_lr(optimizer, epoch + i / steps_per_epoch)
                xs, ys = [], []
                for data, order, g in zip(datas, orders, gens):  # each model's own draws, as train() makes them
                    idx = order[i * opt.batch_size:(i + 1) * opt.batch_size]
                    xs.append(augment(to_float(data.images[idx]), g, opt.crop, opt.flip, opt.cutout))
                    ys.append(data.labels[idx])
                y = torch.stack(ys)
                with _autocast(device, bf16):
                    logits = stacked(params, buffers, torch.stack(xs))  # (models, batch, classes)
                    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
                loss = losses.sum() if reduction == "sum" else losses.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += losses.detach().float() * y.shape[1]
                seen += y.shape[1]
                bar.update()
            means = (total / seen).tolist()
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(means) / len(means):.3f}")
            if on_epoch is not None:
                on_epoch(epoch, means)
    return _unstacked(models, params, buffers)


@torch.no_grad()
def _unstacked(models: list[nn.Module], params: dict, buffers: dict) -> list[nn.Module]:
    """``models`` with the stacked parameters and buffers written back, in eval mode."""
    for i, m in enumerate(models):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            t.copy_((params.get(name) if name in params else buffers[name])[i])
        m.eval()
    return models


@dataclass(frozen=True)
class Job:
    """One model a grid needs: its train stage (key, text), what it trains on and how."""

    stage: tuple[str, str]
    dataset: str
    arch: str
    seed: int
    data: Split
    optim: Optim
    desc: str


def groups(jobs: list[Job], limit: int) -> list[list[Job]]:
    """The jobs that can train as one: the same dataset (so the same classes and image size),
    architecture, schedule and training-set size, in chunks of at most ``limit``, in order."""
    by: dict[tuple, list[Job]] = {}
    for job in jobs:
        by.setdefault((job.dataset, job.arch, job.optim, len(job.data)), []).append(job)
    return [same[i:i + limit] for same in by.values() for i in range(0, len(same), limit)]
