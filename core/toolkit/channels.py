"""A model's channels, for defenses that mask, perturb or prune neurons (CLP, ANP, RNP, fine-pruning)
and those that recompute batch-norm statistics (MCR).

Pairs come from the model's graph (a ``torch.fx`` trace), not from module names or their order: a
batch norm is paired with the convolution whose output it normalises, directly. In a
pre-activation network (the WRNs, PreAct-ResNet-18) each block's *first* BN, and the final one,
normalise a residual sum ``conv(x) + x`` (or ``+ shortcut(x)``): channel k of that sum is not the
output of any single convolution's filter, so such a BN has **no pair** (:func:`bn_after_sum`
lists them). BackdoorBench's CLP pairs every BN with the convolution before it in module order,
which for these BNs is the previous block's last convolution, ignoring the shortcut; here the
defenses that need a pair (CLP's Lipschitz bound) leave them alone, and those that only mask a BN's
neurons (ANP, RNP) use every BN.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import symbolic_trace
from torch.nn.utils import parametrize

from ..training.augment import augment, to_float
from ..contract.config import param
from ..training.evaluate import accuracy
from ..training.train import hold_at_zero

BATCH_NORMS = (nn.BatchNorm2d,)


@dataclass(frozen=True)
class ConvBN:
    conv: str  # module names in the model
    bn: str


def _graph(model: nn.Module):
    try:
        return symbolic_trace(model).graph
    except Exception as exc:  # fx cannot trace data-dependent control flow
        raise TypeError(f"{type(model).__name__} cannot be traced with torch.fx ({exc}); defenses that pair "
                        "convolutions with batch norms need a traceable model") from exc


def _bn_inputs(model: nn.Module):
    """(BN name, the graph node its input comes from, modules by name) for every 2-d batch norm."""
    modules = dict(model.named_modules())
    for node in _graph(model).nodes:
        if node.op == "call_module" and isinstance(modules[node.target], BATCH_NORMS):
            yield node.target, node.args[0], modules


def conv_bn_pairs(model: nn.Module) -> list[ConvBN]:
    """Every (conv, BN) where the BN normalises that convolution's output directly, in graph order."""
    return [ConvBN(src.target, bn) for bn, src, modules in _bn_inputs(model)
            if src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)]


def bn_after_sum(model: nn.Module) -> list[str]:
    """The batch norms that normalise a residual sum (unpaired: see the module docstring)."""
    return [bn for bn, src, _ in _bn_inputs(model)
            if src.op == "call_function" and src.target in (operator.add, torch.add)]


def batch_norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The model's 2-d batch norms by module name: the neurons :func:`prune_bn` and :class:`NeuronMasks` take."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)}


# ------------------------------------------------------------------------------------ neuron masks

class _Scaled(nn.Module):
    """A parametrization: the parameter times ``scale`` (a tensor owned by :class:`NeuronMasks`)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, value):
        return value * self.scale()


class NeuronMasks(nn.Module):
    """Multiplicative masks on the neurons (channels) of a model's batch norms, with optional
    perturbations: BN ``k`` computes ``weight * (mask + dw) * x_hat + bias * (mask_b + db)``, the
    form ANP and RNP optimise. ``bias=False`` leaves the bias unmasked (ANP: only the weight is
    masked; its bias perturbation multiplies ``1 + db``). The masks are this module's only
    parameters (start at 1); the model's own parameters are untouched until :meth:`fold`.

    Use as a context: ``with NeuronMasks(model) as masks: ...`` removes the parametrizations on
    exit (the model is then exactly as before), or call :meth:`fold` to multiply the current masks
    into the weights."""

    def __init__(self, model: nn.Module, names: list[str] | None = None, bias: bool = True):
        super().__init__()
        self.model = [model]  # a list: not a submodule, so parameters() are the masks alone
        norms = batch_norms(model)
        self.names = list(norms) if names is None else list(names)
        self.keys = [n.replace(".", "/") for n in self.names]
        self.weight = nn.ParameterDict({k: nn.Parameter(torch.ones_like(norms[n].weight.detach()))
                                        for k, n in zip(self.keys, self.names)})
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.ones_like(norms[n].bias.detach()))
                                      for k, n in zip(self.keys, self.names)}) if bias else None
        self.noise: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (dw, db); empty: none
        for k, n in zip(self.keys, self.names):
            bn = norms[n]
            parametrize.register_parametrization(bn, "weight", _Scaled(lambda k=k: self._scale(k, 0)))
            parametrize.register_parametrization(bn, "bias", _Scaled(lambda k=k: self._scale(k, 1)))

    def _scale(self, key: str, which: int) -> torch.Tensor:
        masks = self.weight if which == 0 else self.bias
        base = masks[key] if masks is not None else torch.ones_like(self.weight[key])
        noise = self.noise.get(key)
        return base if noise is None else base + noise[which]

    def perturb(self, eps: float, generator: torch.Generator | None = None) -> dict[str, tuple]:
        """Draw uniform perturbations in [-eps, eps] for every masked BN (weight and bias) and use
        them until :meth:`clear`; returns them (leaf tensors that require grad, for an ascent step)."""
        self.noise = {}
        for k, w in self.weight.items():
            pair = tuple((torch.rand(w.shape, generator=generator, device=w.device) * 2 - 1).mul_(eps)
                         .requires_grad_(True) for _ in range(2))
            self.noise[k] = pair
        return self.noise

    def clear(self) -> None:
        self.noise = {}

    def clamp_(self, lo: float = 0.0, hi: float = 1.0) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(lo, hi)

    def values(self) -> dict[str, torch.Tensor]:
        """BN name -> its weight mask (detached)."""
        return {n: self.weight[k].detach() for k, n in zip(self.keys, self.names)}

    def remove(self, fold: bool = False) -> nn.Module:
        """Take the masks off the model; ``fold``: keep their effect multiplied into the weights."""
        self.clear()
        norms = batch_norms(self.model[0])
        for n in self.names:
            for attr in ("weight", "bias"):
                if parametrize.is_parametrized(norms[n], attr):
                    parametrize.remove_parametrizations(norms[n], attr, leave_parametrized=fold)
        return self.model[0]

    def fold(self) -> nn.Module:
        return self.remove(fold=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.no_grad()
def prune_bn(model: nn.Module, channels: dict[str, torch.Tensor | list[int]], bias: bool = True,
             hold: bool = False) -> nn.Module:
    """Prune BN neurons in place: zero the weight (and ``bias``) of ``channels[name]`` of each batch
    norm ``name``, so that the neuron outputs a constant (zero with ``bias``) whatever its input.
    ``hold``: keep them at zero through later training (``nadbench.training.train.hold_at_zero``); without it
    a later :func:`~nadbench.training.train.train` lets them regrow."""
    norms = batch_norms(model)
    for name, idx in channels.items():
        idx = torch.as_tensor(idx, dtype=torch.long, device=norms[name].weight.device)
        for attr in ("weight", "bias") if bias else ("weight",):
            getattr(norms[name], attr)[idx] = 0
            if hold:
                hold_at_zero(norms[name], attr, idx)
    return model


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per output channel k, the spectral norm of the conv filter k scaled by the BN's affine
    factor, ``|gamma_k / sigma_k| * ||W_k||_2`` with ``W_k`` reshaped (in channels, kh * kw): the upper
    bound of channel k's Lipschitz constant CLP ranks by (Zheng et al., ECCV 2022)."""
    w = conv.weight.detach().float().flatten(2)  # (out, in, kh*kw)
    scale = (bn.weight.detach().float() / (bn.running_var.float() + bn.eps).sqrt()).abs()
    return torch.linalg.matrix_norm(w, ord=2) * scale


@torch.inference_mode()
def layer_inputs(model: nn.Module, layer: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """(N, C) inputs of ``layer`` (a module of ``model``, e.g. its classifier) for uint8 ``images``,
    in eval mode: for the classifier, the last features, one per channel."""
    model.eval()
    seen = []
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].float()))
    try:
        for i in range(0, len(images), batch):
            model(to_float(images[i:i + batch]))
    finally:
        hook.remove()
    return torch.cat(seen)


# ------------------------------------------------------------------------------------ selection

def hold_out(clean, share: float, seed: int):
    """(held out, rest) of the defender's clean split: a seeded ``share`` (at least one image) kept
    for the defense's own model selection. A defense never sees test or triggered data, so this is
    the only data a selection rule may read."""
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed)).to(clean.labels.device)
    n_out = max(1, round(share * len(clean)))
    return clean.subset(order[:n_out]), clean.subset(order[n_out:])


def largest_within_drop(curve: list[tuple[float, float]], acc_drop: float):
    """The held-out rule, which reads no ASR: along ``curve``, [(setting, held-out accuracy)] in
    increasing strength from the unchanged model, the last setting before the accuracy first falls
    below (1 - acc_drop) x the first point's. Not BackdoorBench's rule: its ``acc_ratio`` bounds the
    same relative drop of *test* accuracy, then keeps the setting of lowest *test* ASR within it (an
    oracle a defender does not have)."""
    floor = (1 - acc_drop) * curve[0][1]
    chosen = curve[0][0]
    for k, acc in curve:
        if acc < floor:
            break
        chosen = k
    return chosen


MASK_THRESHOLDS = tuple(round(i * 0.05, 2) for i in range(19))  # ANP's and RNP's prune scripts: 0 to 0.9


def below(values: dict[str, torch.Tensor], threshold: float, inclusive: bool = False) -> dict[str, torch.Tensor]:
    """BN name -> the neurons whose mask is below ``threshold`` (``inclusive``: or equal to it)."""
    return {n: (m <= threshold if inclusive else m < threshold).nonzero().flatten() for n, m in values.items()}


def held_out_threshold(model: nn.Module, values: dict[str, torch.Tensor], held, acc_drop: float,
                       inclusive: bool = False) -> tuple[float, list[tuple[float, float]]]:
    """(threshold, curve): the largest of ``MASK_THRESHOLDS`` whose pruning of ``model`` (BN weights of
    the neurons :func:`below` it zeroed) keeps the accuracy on ``held`` within ``acc_drop`` of the
    unpruned model's (:func:`largest_within_drop`), or -1 (prunes nothing) when none does; ``curve``
    is [(threshold, held-out accuracy)], starting with (-1, the unpruned model's)."""
    curve = [(-1.0, accuracy(model, held))]
    curve += [(t, accuracy(prune_bn(copy.deepcopy(model), below(values, t, inclusive), bias=False), held))
              for t in MASK_THRESHOLDS]
    return largest_within_drop(curve, acc_drop), curve


@dataclass(frozen=True)
class MaskPruning:
    """Config fields of a defense that prunes BN neurons by learnt masks (ANP, RNP), and the pruning:
    a defense's ``Config`` subclasses this, splits its clean data with :meth:`split`, learns masks
    on the rest, then calls :meth:`prune`. ``INCLUSIVE``: whether a mask equal to the threshold
    prunes (RNP) or only one below it (ANP)."""

    rule: str = param("held-out", "how the pruning is chosen: held-out (the largest threshold, in steps of 0.05 "
                      "up to 0.9, whose held-out clean accuracy stays within acc_drop) or threshold",
                      choices=("held-out", "threshold"))
    threshold: float = param(0.2, "rule=threshold: prune the neurons whose mask is below (ANP) or at most (RNP) "
                             "this", min=0.0, max=1.0)
    acc_drop: float = param(0.1, "rule=held-out: largest relative drop of held-out clean accuracy", min=0.0, max=1.0)
    held_out: float = param(0.1, "rule=held-out: share of the clean subset kept to choose the pruning", min=0.0,
                            max=0.5, min_exclusive=True)

    def split(self, clean, seed: int):
        """(held out, rest): the held-out share under ``rule=held-out``, else (None, clean)."""
        return hold_out(clean, self.held_out, seed) if self.rule == "held-out" else (None, clean)

    def prune(self, model: nn.Module, values: dict[str, torch.Tensor], held, log, prefix: str,
              inclusive: bool = False) -> nn.Module:
        """Zero the BN weight (bias kept, as ANP's and RNP's official pruning) of the neurons whose
        mask is below the rule's threshold; log ``<prefix>.threshold``, ``.pruned``, ``.pruned_ratio``
        and, under the held-out rule, ``.held_out_acc`` along the sweep."""
        threshold = self.threshold
        if self.rule == "held-out":
            threshold, curve = held_out_threshold(model, values, held, self.acc_drop, inclusive)
            for i, (_, acc) in enumerate(curve):
                log(f"{prefix}.held_out_acc", acc, i)
        chosen = below(values, threshold, inclusive)
        prune_bn(model, chosen, bias=False)
        n = sum(len(i) for i in chosen.values())
        log(f"{prefix}.threshold", threshold)
        log(f"{prefix}.pruned", n)
        log(f"{prefix}.pruned_ratio", n / sum(len(m) for m in values.values()))
        return model.eval()


@torch.no_grad()
def recompute_bn(model: nn.Module, clean, batch_size: int, crop: int = 0, flip: bool = False,
                 seed: int = 0) -> nn.Module:
    """Reset every batch-norm layer's running statistics and recompute them as averages over
    ``clean`` in shuffled batches, augmented with ``crop`` / ``flip`` as the model was trained (as
    the MCR authors do, with their training loader); the weights unchanged. Returns the model in
    eval mode. Shuffled, because splits are sorted by class and class-sorted batches give
    within-class variances (tests/test_defenses.py checks this); augmented, as in training. Both
    choices recovered clean accuracy in an exploratory check (not committed)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    gen = torch.Generator(device=clean.images.device).manual_seed(seed)
    order = torch.randperm(len(clean), generator=gen, device=clean.images.device)
    for i in range(0, len(clean), batch_size):
        model(augment(to_float(clean.images[order[i:i + batch_size]]), gen, crop, flip))
    for m in norms:
        m.momentum = 0.1
    return model.eval()
