"""Attention maps and the NAD loss: the one implementation every defense, report and test uses.

A(F) for a feature map F of shape (B, C, H, W) is an (B, H, W) map (NAD paper, Sec. 3):
  - ``mean_p``: mean_c |F_c|^p   (the paper's default, p = 2)
  - ``sum_p``:  sum_c  |F_c|^p
  - ``sum``:    sum_c  |F_c|
After the per-sample L2 normalisation that NAD applies, ``mean_p`` and ``sum_p`` coincide (they
differ by the factor C); both are kept because the paper names both.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("mean_p", "sum_p", "sum")


def attention_map(feat: torch.Tensor, kind: str = "mean_p", p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) attention map."""
    if kind == "mean_p":
        return feat.abs().pow(p).mean(dim=1)
    if kind == "sum_p":
        return feat.abs().pow(p).sum(dim=1)
    if kind == "sum":
        return feat.abs().sum(dim=1)
    raise ValueError(f"unknown attention function {kind!r}; valid: {', '.join(KINDS)}")


def normalized_attention(feat: torch.Tensor, kind: str = "mean_p", p: float = 2.0,
                         eps: float = 1e-6) -> torch.Tensor:
    """The flattened attention map divided by its L2 norm, per sample: (B, H*W)."""
    a = attention_map(feat, kind, p).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def nad_loss(teacher_feat: torch.Tensor, student_feat: torch.Tensor, kind: str = "mean_p",
             p: float = 2.0, reduction: str = "mse") -> torch.Tensor:
    """Attention-distillation loss between two feature maps of one layer.

    ``reduction="l2"`` is the paper's formula, mean over the batch of
    ||A_T/||A_T|| - A_S/||A_S|| ||_2; ``"mse"`` is the official code's mean squared difference of
    the normalised maps, the form its betas (500/1000/1000) were tuned for.
    The teacher map is detached: only the student learns.
    """
    if teacher_feat.shape[-2:] != student_feat.shape[-2:]:  # different architectures
        teacher_feat = F.interpolate(teacher_feat, size=student_feat.shape[-2:], mode="bilinear",
                                     align_corners=False)
    at = normalized_attention(teacher_feat.detach(), kind, p)
    as_ = normalized_attention(student_feat, kind, p)
    if reduction == "mse":
        return (as_ - at).pow(2).mean()
    if reduction == "l2":
        return (as_ - at).norm(dim=1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; valid: mse, l2")


def check_spatial(feats: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Refuse 1x1 maps: their normalised attention is 1 for every sample, so distilling it does
    nothing (the trap in BackdoorBench's NAD on ResNets at 32x32)."""
    flat = [n for f, n in zip(feats, names) if f.shape[-1] * f.shape[-2] == 1]
    if flat:
        raise ValueError(f"attention layer(s) {', '.join(flat)} have 1x1 feature maps: their NAD "
                         "term is always zero. Choose layers with spatial extent.")


def layer_names(model: nn.Module, spec_layers: Sequence[str]) -> tuple[str, ...]:
    """The attention layers of a built model: its own ``attention_layers`` attribute, else the spec's."""
    inner = getattr(model, "net", model)
    names = tuple(getattr(inner, "attention_layers", None) or spec_layers)
    if not names:
        warnings.warn("model declares no attention layers")
    prefix = "net." if inner is not model else ""
    return tuple(prefix + n for n in names)


@contextmanager
def tap(model: nn.Module, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of the named submodules during forward passes inside the block."""
    feats: list[torch.Tensor] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o: feats.append(o))
               for n in names]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()
