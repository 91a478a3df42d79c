"""Common image corruptions (Hendrycks & Dietterich, ICLR 2019, "ImageNet-C") in torch, on uint8 batches.

The corruptions and their severity constants are those of the ``imagecorruptions`` package (bethgelab,
v1.1.2, the release `pip install imagecorruptions` gives, which TeCo's official code calls). That release
has one set of constants, ImageNet's, which it applies to images of any size (CIFAR's 32x32 included);
so does this module. ``corrupt(images, name, severity, seeds)`` corrupts a uint8 batch (N, C, H, W) on
any device; as in the package, every output goes through [0, 1] clipping, x 255 and truncation to uint8.

Random draws (noise, salt and pepper, the glass-blur offsets, the motion-blur angle, the snow layer,
the fog map, the elastic displacements) are made per image, as the package makes them, but from a
generator seeded by that image's entry of ``seeds``: :func:`image_seeds` derives one from the image's
pixels and a run's seed, so an image's corruption is the same whichever batch it comes in.

What differs from the package:

- ``frost`` is missing: it blends crops of frost photographs shipped inside the package.
- The random draws are torch's (the same laws as the package's NumPy draws, other values).
- Filters are written from the package's library calls (SciPy's ``gaussian_filter``, ``zoom`` and
  ``map_coordinates``, OpenCV's ``GaussianBlur`` and ``filter2D``, scikit-image's HSV round trip,
  Pillow's BOX and NEAREST resizing) with their border rules; they match up to float rounding, which
  can move a pixel by one level after truncation (values a hair under a level: here the level, there
  the one below). JPEG and pixelation are Pillow's, as in the package: JPEG through Pillow itself,
  pixelation emulated in torch (bit-exact).
- ``glass_blur``'s pixel "swap" is a copy in the package (NumPy views of RGB pixels), and a copy here.
"""
from __future__ import annotations

import hashlib
import io
import math
from functools import lru_cache
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

# The package's 15 common corruptions (``get_corruption_names()``), the set TeCo uses, in its order.
COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
          "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
          "jpeg_compression")
MISSING = {"frost": "blends crops of frost photographs that ship inside the imagecorruptions package"}
AVAILABLE = tuple(name for name in COMMON if name not in MISSING)
SEVERITIES = 5

# The package's constants, severity 1..5 (imagecorruptions/corruptions.py, v1.1.2).
_C = {
    "gaussian_noise": (.08, .12, .18, .26, .38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (.03, .06, .09, .17, .27),
    "defocus_blur": ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5)),                # disk radius, alias blur
    "glass_blur": ((.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),   # sigma, max shift, rounds
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),                # radius, sigma
    "zoom_blur": ((1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .02), (1, 1.26, .02), (1, 1.31, .03)),  # arange
    # mean, std, zoom, threshold, blur radius, blur sigma, weight of the image
    "snow": ((.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
             (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)),
    "fog": ((1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)),                 # strength, wibble decay
    "brightness": (.1, .2, .3, .4, .5),
    "contrast": (.4, .3, .2, .1, .05),
    "elastic_transform": (250 * .05, 250 * .065, 250 * .085, 250 * .1, 250 * .12),  # alpha
    "pixelate": (.6, .5, .4, .3, .25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}


class _Corruption(NamedTuple):
    """``draw(generator, image)``: one image's random draws (a tuple of tensors; None: the corruption
    draws nothing); ``apply(images, draws)``: the batch corrupted, given its draws stacked per part."""

    draw: Callable | None
    apply: Callable


def corrupt(images: torch.Tensor, name: str, severity: int, seeds: list[int] | None = None) -> torch.Tensor:
    """``images`` (uint8, N x C x H x W) corrupted by ``name`` at ``severity`` (1..5), uint8 on their
    device. A corruption that draws at random draws each image's from a generator seeded by its entry of
    ``seeds`` (see :func:`image_seeds`)."""
    if name in MISSING:
        raise ValueError(f"corruption {name!r} is not available: it {MISSING[name]}")
    if name not in _MAKERS:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(AVAILABLE)}")
    if not 1 <= severity <= SEVERITIES:
        raise ValueError(f"severity must be in 1..{SEVERITIES}, got {severity}")
    c = _prepared(name, severity, tuple(images.shape[1:]))
    if c.draw is None or len(images) == 0:
        return c.apply(images, None)
    if seeds is None or len(seeds) != len(images):
        raise ValueError(f"{name} draws at random: it needs one seed per image")
    per_image = [c.draw(torch.Generator().manual_seed(s), image) for s, image in zip(seeds, images.cpu())]
    return c.apply(images, tuple(torch.stack(part).to(images.device) for part in zip(*per_image)))


def image_seeds(images: torch.Tensor, *salt: int) -> list[int]:
    """A seed per image from its pixels and ``salt`` (a run's seed, a corruption's number): the same
    image and salt give the same seed, whatever batch the image comes in."""
    key = np.asarray(salt, dtype=np.int64).tobytes()
    rows = images.detach().cpu().contiguous().numpy().reshape(len(images), -1)
    return [int.from_bytes(hashlib.blake2b(row.tobytes() + key, digest_size=8).digest(), "little") >> 1
            for row in rows]


@lru_cache(maxsize=None)
def _prepared(name: str, severity: int, shape: tuple[int, ...]) -> _Corruption:
    return _MAKERS[name](_C[name][severity - 1], shape)


# ------------------------------------------------------------------------------------------ helpers
# Corruptions compute in float64 and truncate to uint8 what lies within _EPS below a level as that
# level: an image's result is then the same whichever batch it comes in (a product's rounding depends
# on the batch's shape), where float32 would move pixels of flat regions (k - 1e-6 against k) by a level.
_EPS = 1e-6


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.double() / 255


def _truncate(x: torch.Tensor) -> torch.Tensor:
    """0..255 floats to uint8 by truncation, as NumPy's ``np.uint8`` in the package."""
    return (x.clamp(0, 255) + _EPS).to(torch.uint8)


def _uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 as the package does: clip, x 255, truncate."""
    return _truncate(x.clamp(0, 1) * 255)


def _border(n: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Source indices of an axis of length ``n`` padded by ``before`` and ``after``: ``nearest`` repeats
    the edge; ``reflect`` mirrors about the edge's outer side (d c b a | a b c d: SciPy's "reflect");
    ``mirror`` about the edge pixel (d c b | a b c d: SciPy's "mirror", OpenCV's default border)."""
    i = torch.arange(-before, n + after)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    period = max(2 * n - 2, 1)
    i = i % period
    return torch.where(i >= n, period - i, i)


def _fft_size(n: int) -> int:
    """The least 2^a 3^b >= n (a fast transform length)."""
    return min(m for m in (2 ** a * 3 ** b for a in range(16) for b in range(10)) if m >= n)


def _correlate(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each (H, W) plane of ``x`` (..., H, W) correlated with a 2-d kernel of odd sides over a border of
    ``mode``, same size out, through the FFT (the part kept is free of its wrap-around)."""
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    rows = _border(h, kh // 2, kh // 2, mode).to(x.device)
    cols = _border(w, kw // 2, kw // 2, mode).to(x.device)
    size = [_fft_size(h + kh - 1), _fft_size(w + kw - 1)]
    flipped = kernel.to(x).flip(0, 1)  # correlation = convolution with the flipped kernel
    spectrum = torch.fft.rfft2(x[..., rows[:, None], cols], s=size) * torch.fft.rfft2(flipped, s=size)
    return torch.fft.irfft2(spectrum, s=size)[..., kh - 1:kh - 1 + h, kw - 1:kw - 1 + w]


def _axis(n: int, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """(n, n): a 1-d correlation with an odd ``kernel`` along an axis of length ``n``, its border folded in."""
    r = len(kernel) // 2
    source = _border(n, r, r, mode)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        out[i].index_add_(0, source[i:i + len(kernel)], kernel.double())
    return out


def _gauss1d(sigma: float, truncate: float) -> torch.Tensor:
    """SciPy's ``gaussian_filter`` kernel: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=None)
def _gaussian_axes(h: int, w: int, sigma: tuple[float, float], mode: str, truncate: float):
    return _axis(h, _gauss1d(sigma[0], truncate), mode), _axis(w, _gauss1d(sigma[1], truncate), mode)


def _gaussian(x: torch.Tensor, sigma, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """scikit-image's ``gaussian`` (SciPy's filter) over the last two axes, ``sigma`` one or (rows,
    cols): a matrix product per axis (the borders, index maps per axis, commute with the passes)."""
    sigma = (sigma, sigma) if np.isscalar(sigma) else tuple(sigma)
    rows, cols = _gaussian_axes(*x.shape[-2:], sigma, mode, truncate)
    return rows.to(x) @ x @ cols.to(x).T


def _cv_gauss1d(ksize: int, sigma: float) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel`` for sigma > 0."""
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The package's anti-aliased disk kernel (a 17x17 or (2r+1)-square disk, Gaussian-blurred with
    OpenCV's default border)."""
    side, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    L = torch.arange(-side, side + 1, dtype=torch.float64)
    disk = ((L[:, None] ** 2 + L[None] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _cv_gauss1d(ksize, alias_blur)
    return _axis(len(L), g, "mirror") @ disk @ _axis(len(L), g, "mirror").T


def _motion_shifts(radius: int, sigma: float, angle: float, h: int, w: int) -> torch.Tensor:
    """The package's ``_motion_blur`` as (2 radius + 1, 3) rows (dy, dx, weight): a one-sided Gaussian-
    weighted sum of the image shifted along ``angle``; weight 0 from where the motion leaves an (h, w) image."""
    width = 2 * radius + 1
    k = [math.exp(-i ** 2 / (2 * sigma ** 2)) for i in range(width)]
    point = (width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle)))
    hypot = math.hypot(*point)
    rows = []
    for i in range(width):
        dy = -math.ceil(i * point[0] / hypot - 0.5)
        dx = -math.ceil(i * point[1] / hypot - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break  # the motion left the image
        rows.append((dy, dx, k[i] / sum(k)))
    return torch.tensor(rows + [(0, 0, 0.0)] * (width - len(rows)), dtype=torch.float64)


def _shift_sum(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Per image n of ``x`` (N, ..., H, W): the sum over rows (dy, dx, weight) of ``shifts[n]`` (T, 3) of
    weight x the image moved by (dx, dy), its uncovered border repeating the edge (the package's ``shift``)."""
    n, h, w = x.shape[0], *x.shape[-2:]
    flat = x.flatten(-2)
    out = torch.zeros_like(flat)
    at_h, at_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for i in range(shifts.shape[1]):
        dy, dx, weight = shifts[:, i, 0].long(), shifts[:, i, 1].long(), shifts[:, i, 2]
        rows = (at_h - dy[:, None]).clamp(0, h - 1)
        cols = (at_w - dx[:, None]).clamp(0, w - 1)
        source = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, *[1] * (x.dim() - 3), h * w)
        out += weight.reshape(n, *[1] * (x.dim() - 2)) * flat.gather(-1, source.expand_as(flat))
    return out.reshape(x.shape)


def _zoom_rows(n: int, factor: float) -> torch.Tensor:
    """(m, n): the rows of SciPy's order-1 ``zoom`` by ``factor`` of the centre crop of an axis of
    length ``n`` (the package's ``clipped_zoom``), all m = round(ceil(n / factor) * factor) of them."""
    crop = math.ceil(n / factor)
    top = (n - crop) // 2
    m = int(round(crop * factor))
    step = (crop - 1) / (m - 1) if m > 1 else 0.0
    out = torch.zeros(m, n, dtype=torch.float64)
    for o in range(m):
        src = o * step
        i = min(int(math.floor(src)), crop - 1)
        t = src - i
        out[o, top + i] += 1 - t
        if t > 0:
            out[o, top + i + 1] += t
    return out


def _pil_box(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) Pillow's BOX resampling weights, in its 22-bit fixed point (integers as floats)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = torch.tensor([1.0 if -0.5 < (j - center + 0.5) / fscale <= 0.5 else 0.0 for j in range(lo, hi)],
                         dtype=torch.float64)
        out[o, lo:hi] = torch.floor(w / w.sum() * (1 << 22) + 0.5)
    return out


def _pil_resample(x: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of Pillow's 8-bit resampling of uint8-valued floats along ``dim`` (-1 or -2): the
    fixed-point sum, rounded half up, clipped to 0..255."""
    w = weights.to(x.device)
    s = torch.matmul(x, w.T) if dim == -1 else torch.matmul(w, x)
    return torch.floor((s + (1 << 21)) / (1 << 22)).clamp(0, 255)


def _uniform(g: torch.Generator, shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low


# ------------------------------------------------------------------------------------------ noise
def _gaussian_noise(c, shape):
    return _Corruption(lambda g, image: (torch.randn(shape, generator=g, dtype=torch.float64),),
                       lambda images, d: _uint8(_float(images) + c * d[0]))


def _shot_noise(c, shape):
    return _Corruption(lambda g, image: (torch.poisson(_float(image) * c, generator=g),),
                       lambda images, d: _uint8(d[0] / c))


def _impulse_noise(c, shape):
    def apply(images, d):  # scikit-image's "s&p": a share c of the values flipped, half to 1, half to 0
        flipped, salted = d[0] <= c, d[1] <= 0.5
        return _uint8(torch.where(flipped & salted, 1.0, torch.where(flipped & ~salted, 0.0, _float(images))))
    return _Corruption(lambda g, image: (_uniform(g, shape), _uniform(g, shape)), apply)


# ------------------------------------------------------------------------------------------ blur
def _defocus_blur(c, shape):
    kernel = _disk(*c)
    return _Corruption(None, lambda images, d: _uint8(_correlate(_float(images), kernel, "mirror")))


def _glass_blur(c, shape):
    sigma, delta, rounds = c
    h, w = shape[1:]
    span = range(h - delta, delta, -1), range(w - delta, delta, -1)
    targets = [y * w + x for y in span[0] for x in span[1]]  # the package's visiting order

    def draw(g, image):
        return (torch.randint(-delta, delta, (rounds, len(span[0]), len(span[1]), 2), generator=g),)

    def apply(images, d):
        n = len(images)
        shifts = d[0].reshape(n, rounds, -1, 2)
        target = torch.tensor(targets, device=images.device)
        source = target + shifts[..., 1] * w + shifts[..., 0]  # (dx, dy) drawn in that order
        shown = torch.arange(h * w, device=images.device).repeat(n, 1)  # the pixel each position shows
        for r in range(rounds):
            for j, t in enumerate(targets):  # sequential copies: later ones read earlier results
                shown[:, t] = shown.gather(1, source[:, r, j:j + 1])[:, 0]
        x = _uint8(_gaussian(_float(images), sigma)).flatten(-2)
        x = x.gather(-1, shown[:, None].expand_as(x)).reshape(images.shape)
        return _uint8(_gaussian(_float(x), sigma))
    return _Corruption(draw, apply)


def _motion_blur(c, shape):
    def draw(g, image):
        return (_motion_shifts(*c, float(_uniform(g, (), -45, 45)), *shape[1:]),)
    return _Corruption(draw, lambda images, d: _truncate(_shift_sum(images.double(), d[0])))


def _zoom_blur(c, shape):
    h, w = shape[1:]
    ops = [(_zoom_rows(h, z)[:h], _zoom_rows(w, z)[:w]) for z in np.arange(*c).tolist()]

    def apply(images, d):
        x = _float(images)
        out = x.clone()
        for rows, cols in ops:
            out += rows.to(x.device) @ x @ cols.to(x.device).T
        return _uint8(out / (len(ops) + 1))
    return _Corruption(None, apply)


# ------------------------------------------------------------------------------------------ weather
def _snow(c, shape):
    mean, std, zoom, threshold, radius, sigma, keep = c
    h, w = shape[1:]
    rows, cols = _zoom_rows(h, zoom), _zoom_rows(w, zoom)

    def draw(g, image):
        layer = torch.randn(h, w, generator=g, dtype=torch.float64) * std + mean
        return layer, _motion_shifts(radius, sigma, float(_uniform(g, (), -135, -45)), len(rows), len(cols))

    def apply(images, d):
        layer = rows.to(images.device) @ d[0] @ cols.to(images.device).T  # zoomed, not yet cropped
        layer = torch.where(layer < threshold, 0.0, layer).clamp(0, 1)
        layer = (torch.round(_shift_sum(layer, d[1]) * 255) / 255)[:, None, :h, :w]
        x = _float(images)
        gray = (x * torch.tensor([.299, .587, .114], device=x.device)[:, None, None]).sum(1, keepdim=True) \
            if x.shape[1] == 3 else x
        x = keep * x + (1 - keep) * torch.maximum(x, gray * 1.5 + 0.5)
        return _uint8(x + layer + layer.flip(-2, -1))  # the layer and its half-turn
    return _Corruption(draw, apply)


def _plasma_draws(size: int) -> int:
    """How many uniform draws the diamond-square map of ``size`` takes."""
    return sum(3 * (size // step) ** 2 for step in (1 << k for k in range(1, size.bit_length())))


def _plasma(uniforms: torch.Tensor, size: int, decay: float) -> torch.Tensor:
    """The package's diamond-square height maps (N, size, size) (size a power of two), scaled to [0, 1];
    ``uniforms`` (N, _plasma_draws(size)): each map's draws in [0, 1), taken in order."""
    n = len(uniforms)
    m = torch.zeros(n, size, size, dtype=torch.float64, device=uniforms.device)
    step, wibble, used = size, 100.0, 0

    def wibbled(a):  # the package's noise: wibble times a uniform draw in [-wibble, wibble]
        nonlocal used
        u = uniforms[:, used:used + a[0].numel()].reshape(a.shape)
        used += a[0].numel()
        return a / 4 + wibble * (u * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = wibbled(square + square.roll(-1, 2))
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _fog(c, shape):
    strength, decay = c
    h, w = shape[1:]
    size = 1 << (max(shape) - 1).bit_length()

    def apply(images, d):
        x = _float(images)
        top = x.amax(dim=(1, 2, 3), keepdim=True)
        fog = strength * _plasma(d[0], size, decay)[:, None, :h, :w]
        return _uint8((x + fog) * top / (top + strength))
    return _Corruption(lambda g, image: (_uniform(g, _plasma_draws(size)),), apply)


# ------------------------------------------------------------------------------------------ digital
def _brightness(c, shape):
    def apply(images, d):
        x = _float(images)
        if x.shape[1] != 3:
            return _uint8(x + c)
        # scikit-image's HSV round trip with V raised by c: at fixed hue and saturation RGB is
        # proportional to V; a black pixel (V = 0, no hue) comes back gray.
        v = x.amax(1, keepdim=True)
        lifted = (v + c).clamp(0, 1)
        return _uint8(torch.where(v > 0, x * lifted / v.clamp_min(1e-12), lifted))
    return _Corruption(None, apply)


def _contrast(c, shape):
    def apply(images, d):
        x = _float(images)
        means = x.mean(dim=(2, 3), keepdim=True)
        return _uint8((x - means) * c + means)
    return _Corruption(None, apply)


def _elastic_transform(alpha, shape):
    h, w = shape[1:]
    sigma, most = (h * 0.01, w * 0.01), h * 0.005

    def draw(g, image):  # the displacements: smoothed uniform noise, dx first
        return tuple(_gaussian(_uniform(g, (h, w), -most, most), sigma, "reflect", truncate=3) * alpha
                     for _ in range(2))

    def fold(coord, n):  # SciPy's "reflect" boundary (about the edges' outer sides), then order-1 neighbours
        coord = (coord + 0.5) % (2 * n) - 0.5
        coord = torch.where(coord > n - 0.5, 2 * n - 1 - coord, coord)
        lo = torch.floor(coord)
        return lo.long().clamp(0, n - 1), (lo + 1).long().clamp(0, n - 1), coord - lo

    def apply(images, d):
        x = _float(images).flatten(-2)
        grid = torch.arange(h, device=x.device, dtype=torch.float64)[:, None], \
            torch.arange(w, device=x.device, dtype=torch.float64)
        r0, r1, a = fold(grid[0] + d[1], h)
        c0, c1, b = fold(grid[1] + d[0], w)

        def at(r, c):
            return x.gather(-1, (r * w + c).flatten(1)[:, None].expand_as(x)).reshape(images.shape)
        a, b = a[:, None], b[:, None]
        return _uint8((1 - a) * (1 - b) * at(r0, c0) + (1 - a) * b * at(r0, c1)
                      + a * (1 - b) * at(r1, c0) + a * b * at(r1, c1))
    return _Corruption(draw, apply)


def _pixelate(c, shape):
    h, w = shape[1:]
    small_h, small_w = int(h * c), int(w * c)
    down_w, down_h = _pil_box(w, small_w), _pil_box(h, small_h)
    # Pillow's NEAREST upscaling: source = floor((i + 0.5) * small / big)
    up_h = ((torch.arange(h) + 0.5) * small_h / h).long()
    up_w = ((torch.arange(w) + 0.5) * small_w / w).long()

    def apply(images, d):
        x = images.double()
        x = _pil_resample(_pil_resample(x, down_w, -1), down_h, -2)  # Pillow: horizontal pass first
        return x[..., up_h.to(x.device)[:, None], up_w.to(x.device)].to(torch.uint8)
    return _Corruption(None, apply)


def _jpeg_compression(quality, shape):
    def apply(images, d):  # Pillow's encoder and decoder, as the package calls them
        out = []
        for image in images.cpu().numpy():
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1 else
                            image.transpose(1, 2, 0)).save(buffer, "JPEG", quality=quality)
            out.append(np.asarray(Image.open(buffer)).reshape(image.shape[1], image.shape[2], -1).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(out)).to(images.device)
    return _Corruption(None, apply)


_MAKERS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}
