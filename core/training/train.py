"""The one training loop. Attacks, defenses and the engine all call it (the one evaluation is
``nadbench.training.evaluate``, kept apart so that an edit to it re-evaluates cells without retraining models).

What a step does is its one extension point: a :class:`Step` passed as ``train(..., step=)`` changes
the batch before augmentation (an attack's per-batch samples), the loss (NAD's attention term) or
the whole update (a second forward pass, another module's optimiser, masks-only parameters); the
loop keeps batching, the schedule, augmentation, precision and progress. No plugin writes a loop.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import settings
from ..contract.api import Split
from .augment import augment, to_float
from ..contract.config import PluginError, param

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Optim:
    """The optimiser of one training phase (SGD by default, Adam, AdamW), its settings and its
    learning-rate schedule. The loop builds it (:meth:`build`) and sets its learning rate before
    every step (:meth:`set_lr`); a step's side networks each have one too (:meth:`Step.networks`)."""

    epochs: int
    lr: float = 0.1
    batch_size: int = 64
    momentum: float = 0.9           # sgd
    nesterov: bool = True           # sgd
    weight_decay: float = 1e-4      # L2 (sgd, adam) or decoupled (adamw)
    schedule: str = "step"          # step | cosine | onecycle
    milestones: tuple[float, ...] = ()  # "step": lr *= gamma at the start of each listed epoch
    gamma: float = 0.1
    crop: int = 0                   # random-crop padding (0: off)
    flip: bool = False
    cutout: int = 0                 # cutout square size (0: off)
    optimizer: str = "sgd"          # sgd | adam | adamw
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    start: float = 0.0              # the schedule runs over epochs [start, epochs), compressed into them
    #                                 (side networks train first); before ``start`` the lr is the first

    def lr_at(self, t: float) -> float:
        """Learning rate at fractional epoch ``t``."""
        if self.start:
            t = max(t - self.start, 0.0) * self.epochs / (self.epochs - self.start)
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(t >= m for m in self.milestones)
        frac = t / max(self.epochs, 1e-9)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        if self.schedule == "onecycle":  # linear warm-up over 20%, then linear decay to 0
            return self.lr * (frac / 0.2 if frac < 0.2 else max(0.0, (1 - frac) / 0.8))
        raise ValueError(f"unknown schedule {self.schedule!r}; valid: step, cosine, onecycle")

    def build(self, params) -> torch.optim.Optimizer:
        """The torch optimiser over ``params`` (parameters or parameter groups) at ``lr``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   nesterov=self.nesterov and self.momentum > 0, weight_decay=self.weight_decay)
        if self.optimizer in ("adam", "adamw"):
            cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
            return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    def set_lr(self, optimizer: torch.optim.Optimizer, t: float) -> None:
        """Set ``optimizer``'s learning rate to the schedule's at fractional epoch ``t``: the one place
        a learning rate is assigned (a test pins it)."""
        lr = self.lr_at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


class Step:
    """What one step of :func:`train` does; this base class is plain cross-entropy on the run's
    optimiser. Override any of its methods (each has the default behaviour):

    - :meth:`batch` — the float [0, 1] batch before augmentation (``index``: its rows of the
      training set): poison or add samples per batch. ``x``, ``y``, ``index`` and ``generator`` (the
      loop's, seeded by the run's seed: draw every random choice from it) are on the model's device;
    - :meth:`loss` — the objective on the (augmented) batch: one number (a 0-d tensor), checked;
    - :meth:`update` — forward, backward and optimiser step(s), e.g. two passes (SAM), a gradient of
      its own (an implicit hypergradient), or a side network's optimiser beside the model's;
    - :meth:`parameters` — what the model's optimiser optimises (e.g. only masks);
    - :meth:`networks` — side networks the step trains beside the model, each with its own
      optimiser and schedule, which the loop builds and schedules (``self.optimizers[name]``);
    - :meth:`schedule` — the model's schedule for this step, from the run's (e.g. compressed into
      the epochs after a side network's own);
    - :meth:`end_epoch` — after each epoch; returning True ends training there (an early stop,
      e.g. RNP's unlearning, which stops once clean accuracy has collapsed).

    A step whose ``loss`` and ``update`` are the defaults trains the model as plain cross-entropy,
    which the loop may run channels-last or compiled (see :func:`channels_last`, :func:`compiled`).
    An ``update`` runs its forward passes under ``self.autocast()``, which the loop sets to the
    run's precision (backward passes outside it). The loop also sets ``self.optim`` (the model's
    :class:`Optim`) before the first step and ``self.t`` (the fractional epoch) before each.
    """

    autocast: Callable[[], Any] = contextlib.nullcontext
    optim: "Optim | None" = None  # the model's schedule (epochs, lr), set by the loop before the first step
    optimizers: "dict[str, torch.optim.Optimizer]" = {}  # the side networks', by name (networks())
    t: float = 0.0  # the current step's fractional epoch, set by the loop

    def batch(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(model, x, y)

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss for the progress bar and tracking."""
        with self.autocast():
            loss = scalar_loss(self, self.loss(model, x, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def networks(self, model: nn.Module, data: Split) -> "dict[str, tuple[nn.Module, Optim]]":
        """Side networks to train beside ``model`` (on ``data``), by name, each with its optimiser and
        schedule (its ``epochs`` scale a cosine or onecycle schedule; batching and augmentation are
        the run's). Called once, before the first batch; ``update`` steps ``self.optimizers[name]``."""
        return {}

    def schedule(self, optim: Optim) -> Optim:
        """The model's :class:`Optim` for this step, given the run's."""
        return optim

    def end_epoch(self, epoch: int) -> bool | None:
        return None

    def plain(self) -> bool:
        return type(self).loss is Step.loss and type(self).update is Step.update


def scalar_loss(step: Step, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` if it is one number; a per-sample loss (torch's backward would fail with a message
    naming neither the plugin nor the rule) is refused naming the step that returned it."""
    if loss.ndim:
        fn = getattr(step, "loss_fn", None)
        who = (f"loss_fn {fn.__module__}.{fn.__qualname__}" if fn is not None and hasattr(fn, "__qualname__")
               else f"{type(step).__module__}.{type(step).__qualname__}.loss()")
        raise PluginError(f"{who} returned a loss of shape {tuple(loss.shape)}: a training step's loss must be "
                          "one number for the batch: reduce per-sample losses, e.g. with .mean()")
    return loss


HELD = "_held_at_zero"  # the suffix of the buffer marking a parameter's held entries (hold_at_zero)


def hold_at_zero(module: nn.Module, name: str, index) -> None:
    """Hold entries ``index`` of ``module``'s parameter ``name`` at zero through every later
    :func:`train`, which zeroes them again after each step (pruned neurons that must not regrow). They
    are marked in a non-persistent buffer ``<name>_held_at_zero``: the state dict is unchanged, and a
    deep copy or a move to another device holds them too."""
    value = getattr(module, name)
    held = getattr(module, name + HELD, None)
    if held is None:
        held = torch.zeros(value.shape, dtype=torch.bool, device=value.device)
        module.register_buffer(name + HELD, held, persistent=False)
    held[index] = True
    with torch.no_grad():
        _original(module, name).masked_fill_(held, 0)


def _original(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter itself, under a parametrization too (NeuronMasks)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _held(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, mask) of every parameter with entries held at zero (:func:`hold_at_zero`)."""
    return [(_original(m, n[:-len(HELD)]), mask) for m in model.modules()
            for n, mask in m.named_buffers(recurse=False) if n.endswith(HELD)]


@torch.no_grad()
def _zero_held(held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for tensor, mask in held:
        tensor.masked_fill_(mask, 0)


class LossStep(Step):
    """A step with another objective: ``loss_fn(model, x, y)`` (``train(..., loss_fn=)``)."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn

    def loss(self, model, x, y):
        return self.loss_fn(model, x, y)


def precision(device: torch.device) -> str:
    """``bf16`` (autocast) or ``float32`` for training and evaluation on ``device``: the precision of
    the run settings in force (:func:`nadbench.training.settings.current`; ``bench run --precision``)."""
    return settings.current().precision_on(device.type)


def channels_last(device: torch.device, plain: bool = True) -> bool:
    """Channels-last memory format, for the plain cross-entropy phases (``plain``: backdoor training,
    finetuning) on the CPU, where it trained WRN-16-1's backdoor phase faster and the NAD phase, whose
    attention maps reduce over channels, no faster; on the H200 float32 NCHW was fastest
    (benchmarks/speed.py; benchmarks/results/speed-cpu.md, cpu-memory-format/, speed-cuda.md)."""
    return device.type == "cpu" and plain


def compiled() -> bool:
    """Whether the run settings in force ask for ``torch.compile`` of the plain cross-entropy phases
    (``bench run --compile``). Off by default: it costs a compilation per process, and on an H200 it did
    not beat eager float32 (benchmarks/results/speed-cuda.md)."""
    return settings.current().compile


def numerics(run: settings.RunSettings, device: torch.device) -> str:
    """What of ``run`` changes a backdoor-trained model's weights on ``device`` (precision,
    channels-last, compile; fused: another code path trains it), for train keys. ``threads`` is left
    out (see :mod:`nadbench.training.settings`)."""
    parts = [run.precision_on(device.type)] + ["channels-last"] * channels_last(device)
    return "+".join(parts + ["compile"] * run.compile + ["fused"] * run.fused)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _optimizers(step: Step, model: nn.Module, data: Split, opt: Optim):
    """The model's optimiser over ``step.parameters(model)``, the side networks' (``step.networks``,
    set as ``step.optimizers``), and each optimiser with its schedule."""
    decay, no_decay = [], []
    for p in step.parameters(model):
        (decay if p.ndim > 1 else no_decay).append(p)
    # Weight decay on all parameters, as the reference code does (BN included).
    optimizer = opt.build([{"params": decay}, {"params": no_decay}])
    side = {name: (net_opt, net_opt.build([p for p in net.parameters() if p.requires_grad]))
            for name, (net, net_opt) in step.networks(model, data).items()}
    step.optimizers = {name: built for name, (_, built) in side.items()}
    return optimizer, [(opt, optimizer), *side.values()]


def train(model: nn.Module, data: Split, opt: Optim, *, seed: int, step: Step | None = None,
          loss_fn: LossFn | None = None, desc: str = "train", progress: bool = True,
          on_epoch: Callable[[int, float], None] | None = None,
          on_step: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``model`` in place on ``data`` (uint8 on the model's device) and return it.

    ``opt`` is the optimiser and its schedule (SGD, Adam, AdamW; :class:`Optim`). Batches are index
    permutations of the device-resident data; augmentation runs batched.
    ``step`` changes what a step does (see :class:`Step`); ``loss_fn`` is short for
    ``step=LossStep(loss_fn)``. ``on_epoch(epoch, mean_loss)`` is called after every epoch,
    ``on_step(i)`` after every optimiser step (i = 0 first). Entries held at zero
    (:func:`hold_at_zero`) are zeroed again after every step.
    """
    if step is not None and loss_fn is not None:
        raise TypeError("train() takes step= or loss_fn=, not both")
    step = LossStep(loss_fn) if loss_fn is not None else step or Step()
    device = next(model.parameters()).device
    bf16 = precision(device) == "bf16"
    plain = step.plain()
    opt = step.schedule(opt)
    step.autocast, step.optim = (lambda: _autocast(device, bf16)), opt
    fmt = torch.channels_last if channels_last(device, plain) else torch.contiguous_format
    forward = torch.compile(model.to(memory_format=fmt)) if plain and compiled() else model.to(memory_format=fmt)
    torch.set_flush_denormal(True)  # tiny gradients become denormals, which slow CPU kernels; no result moves
    gen = torch.Generator(device=device).manual_seed(seed)
    optimizer, schedules = _optimizers(step, model, data, opt)
    n = len(data)
    steps_per_epoch = math.ceil(n / opt.batch_size)
    held = _held(model)
    model.train()
    bar = tqdm(total=opt.epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False,
               unit="batch", dynamic_ncols=True)
    with bar:
        for epoch in range(opt.epochs):
            order = torch.randperm(n, device=device, generator=gen)
            total, seen = torch.zeros((), device=device), 0
            for i in range(steps_per_epoch):
                step.t = epoch + i / steps_per_epoch
                for schedule, built in schedules:
                    schedule.set_lr(built, step.t)
                idx = order[i * opt.batch_size:(i + 1) * opt.batch_size]
                x, y = step.batch(to_float(data.images[idx]), data.labels[idx], idx, gen)
                x = augment(x, gen, opt.crop, opt.flip, opt.cutout)
                loss = step.update(forward, x.contiguous(memory_format=fmt), y, optimizer)
                _zero_held(held)
                if on_step is not None:
                    on_step(epoch * steps_per_epoch + i)
                total += loss * len(y)
                seen += len(y)
                bar.update()
            mean_loss = float(total) / seen
            bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.3f}")
            stop = step.end_epoch(epoch)
            if on_epoch is not None:
                on_epoch(epoch, mean_loss)
            if stop:
                break
    model.eval()
    return model


@dataclass(frozen=True)
class FinetuneParams:
    """Training fields shared by finetuning-style defenses, with the NAD paper's settings.

    A defense's ``Config`` subclasses this and adds its own fields; :meth:`optim` turns it into
    the loop's :class:`Optim`.
    """

    epochs: int = param(10, "training epochs on the clean subset", min=1, max=1000)
    lr: float = param(0.1, "initial learning rate", min=0.0, max=10.0)
    milestones: tuple[int, ...] = param((2,), "epochs at which the learning rate drops 10x", min=0)
    batch_size: int = param(64, "batch size", min=1, max=65536)
    weight_decay: float = param(1e-4, "SGD weight decay", min=0.0, max=1.0)
    momentum: float = param(0.9, "SGD momentum (Nesterov)", min=0.0, max=1.0)
    crop: int = param(4, "random-crop padding in pixels (0: off)", min=0, max=16)
    flip: bool = param(True, "random horizontal flips")
    cutout: int = param(3, "cutout square size in pixels (0: off)", min=0, max=32)

    def optim(self, epochs: int | None = None) -> Optim:
        return Optim(epochs=self.epochs if epochs is None else epochs, lr=self.lr,
                     batch_size=self.batch_size, momentum=self.momentum, nesterov=True,
                     weight_decay=self.weight_decay, schedule="step", milestones=self.milestones,
                     crop=self.crop, flip=self.flip, cutout=self.cutout)
