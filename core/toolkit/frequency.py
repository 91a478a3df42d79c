"""Frequency-domain helpers: an orthonormal 2-D DCT-II on blocks, and RGB <-> YUV.

Frequency attacks (FTrojan, Wang et al., ECCV 2022) and defenses that filter frequencies work on DCT
coefficients of colour channels. Here the DCT is a product with a precomputed DCT matrix, batched over
float (N, C, H, W) tensors on any device: no per-image Python, no SciPy or OpenCV. It is orthonormal,
as OpenCV's ``cv2.dct`` that the official FTrojan code calls per block, so a coefficient's magnitude
means the same as there, and energy is preserved (a change of m in one coefficient changes the
image by m in L2).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _dct64(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): row k is the k-th cosine basis; D @ D.T = I."""
    return _dct64(n).to(device=device, dtype=dtype)


def _blockwise(x: torch.Tensor, block: int | None, spec: str) -> torch.Tensor:
    n, c, h, w = x.shape
    bh, bw = block or h, block or w
    if h % bh or w % bw:
        raise ValueError(f"block size {block} does not divide the image size {h} x {w}")
    rows, cols = dct_matrix(bh, x.dtype, x.device), dct_matrix(bw, x.dtype, x.device)
    out = torch.einsum(spec, rows, x.reshape(n, c, h // bh, bh, w // bw, bw), cols)
    return out.reshape(n, c, h, w)


def dct2(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """2-D DCT-II of each ``block`` x ``block`` tile of float images (N, C, H, W) (None: the whole
    image); coefficient (u, v) of a tile sits at its row u, column v, as with ``cv2.dct``."""
    return _blockwise(x, block, "ki,ncaibj,lj->ncakbl")


def idct2(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The inverse of :func:`dct2` (the DCT matrix is orthogonal: its transpose)."""
    return _blockwise(x, block, "ki,ncakbl,lj->ncaibj")


# JPEG / BT.601 full range, as OpenCV's RGB2YCrCb used by the official FTrojan code:
# Y = 0.299 R + 0.587 G + 0.114 B, U (Cb) = (B - Y) / 1.772, V (Cr) = (R - Y) / 1.402. OpenCV adds
# 128 to Cb and Cr and orders them Cr, Cb; the offset only moves the DC coefficient, so it is left out.
_RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114],
                            [-0.299 / 1.772, -0.587 / 1.772, 0.886 / 1.772],
                            [0.701 / 1.402, -0.587 / 1.402, -0.114 / 1.402]], dtype=torch.float64)
_YUV_TO_RGB = torch.linalg.inv(_RGB_TO_YUV)


def _colour(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        raise ValueError(f"a colour transform needs 3 channels, got {x.shape[1]}")
    return torch.einsum("dc,nchw->ndhw", matrix.to(x.device, x.dtype), x)


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    """Float RGB (N, 3, H, W) -> Y, U, V (zero-centred chroma, same scale as the input)."""
    return _colour(_RGB_TO_YUV, x)


def yuv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`rgb_to_yuv`."""
    return _colour(_YUV_TO_RGB, x)


def gaussian_lowpass(x: torch.Tensor, sigma: float = 6.0, size: int = 30) -> torch.Tensor:
    """Separable Gaussian blur of float images (N, C, H, W): the LF attack's low-pass filter.

    As the official code (Zeng et al., ICCV 2021, ``gauss_smooth``): a ``size``-tap kernel of
    standard deviation ``sigma`` pixels, zero padding (so the border is darkened as there), output
    the size of the input."""
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype).to(x.device)
    c = x.shape[1]
    # the official pad: (size // 2 - even, size // 2) before and after, so the output keeps its size
    before = size // 2 - (1 - size % 2)
    x = torch.nn.functional.pad(x, (before, size // 2, before, size // 2))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
