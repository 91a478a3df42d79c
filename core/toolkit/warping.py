"""Image warping (WaNet, Nguyen & Tran, ICLR 2021): a smooth random flow field and its application.

The field follows the official code (VinAIResearch/Warping-based_Backdoor_Attack-release): a k x k
grid of uniform [-1, 1] offsets normalised to mean magnitude 1, upsampled bicubically to the image
size, scaled by ``s / size`` and added to the identity sampling grid, clamped to the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(size: int) -> torch.Tensor:
    """The sampling grid that leaves an image as it is: (1, size, size, 2), x then y, in [-1, 1]."""
    line = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(line, line, indexing="ij")
    return torch.stack((x, y), 2)[None]


def flow_field(k: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The random flow (1, size, size, 2) of magnitude ~1 pixel per unit of strength."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    return F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp_grid(flow: torch.Tensor, strength: float) -> torch.Tensor:
    """The backdoor's sampling grid: identity + ``strength`` * flow / size, clamped to [-1, 1]."""
    size = flow.shape[1]
    return (identity_grid(size) + strength * flow / size).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp float images (N, C, H, W) with a grid (1 or N, H, W, 2), bilinear as the official code."""
    grid = grid.to(images.device, images.dtype).expand(len(images), -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", align_corners=True)


def noisy(grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` copies of ``grid`` with independent uniform noise of up to one pixel (WaNet's noise mode)."""
    size = grid.shape[1]
    noise = (torch.rand(n, size, size, 2, generator=generator, device=generator.device) * 2 - 1) / size
    return (grid.to(noise.device) + noise).clamp(-1, 1)
