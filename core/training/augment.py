"""Batched augmentation and normalisation on the device: no per-image Python, no PIL.

Every function takes a whole float batch (N, C, H, W) and a ``torch.Generator`` on the batch's
device, so results are reproducible under a seed.
"""
from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset per image (a random translation)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, None, :, None]  # (N,1,H,1)
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, None, :]  # (N,1,1,W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror half of the images left-right."""
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square (clipped at the border) at a random centre per image."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    lo = size // 2
    hole = (ys >= cy - lo) & (ys < cy - lo + size) & (xs >= cx - lo) & (xs < cx - lo + size)
    return x * (~hole)[:, None].to(x.dtype)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; models take [0, 1] input and normalise inside."""
    return images.float().div_(255)


def augment(x: torch.Tensor, gen: torch.Generator, crop: int = 0, flip: bool = False,
            cutout_size: int = 0) -> torch.Tensor:
    if crop:
        x = random_crop(x, crop, gen)
    if flip:
        x = random_flip(x, gen)
    if cutout_size:
        x = cutout(x, cutout_size, gen)
    return x
