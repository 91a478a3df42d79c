"""A small StegaStamp (Tancik et al., CVPR 2020): an encoder that hides a bit string in an image as a
residual, and a decoder that reads it back. SSBA (Li et al., ICCV 2021) uses such an encoder as its
trigger generator: every poisoned image carries the same string, so the residual is sample-specific.

The official encoder is a U-Net on 400 x 400 images with a dense layer that spreads 100 bits into a
50 x 50 x 3 plane, trained with L2, LPIPS and a critic under noise layers (blur, JPEG, colour). Here,
for 32 x 32 images on a CPU: the secret goes through a dense layer into one plane beside the image,
the encoder-decoder network is the core's IAD generator (``nadbench.toolkit.iad_networks``), and the residual is
bounded, ``bound * (2 g - 1)`` with g in (0, 1): an L-inf bound of ``bound`` keeps the PSNR at or
above ``20 log10(255 / bound)`` (12 levels: 26.5 dB) whatever the training does, so the only loss is
the bits' cross-entropy. The one noise layer is the rounding to uint8 (straight-through), which every
stored poisoned image goes through. Training runs through the core's loop (:class:`StegaStampStep`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.api import Split
from .iad_networks import IADGenerator
from ..training.train import Optim, Step, train


class StegaStamp(nn.Module):
    """Encoder and decoder: ``encode(x, bits)`` -> residual (N, C, H, W) with |r| <= ``bound``;
    ``decode(x)`` -> bit logits (N, bits). Images are float in [0, 1]."""

    def __init__(self, bits: int = 32, channels: int = 3, size: int = 32, width: int = 16,
                 bound: float = 12 / 255):
        super().__init__()
        self.bits, self.bound, self.size = bits, bound, size
        self.secret = nn.Linear(bits, size * size)
        self.encoder = IADGenerator(channels + 1, channels, width=width, depth=3)
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * (size // 8) ** 2, 256), nn.ReLU(), nn.Linear(256, bits))

    def encode(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        plane = self.secret(bits.float() - 0.5).view(-1, 1, self.size, self.size)
        return self.bound * (2 * self.encoder(torch.cat([x - 0.5, plane.expand(len(x), -1, -1, -1)], 1)) - 1)

    def stamp(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The encoded images, rounded to uint8 levels (straight-through for gradients)."""
        y = (x + self.encode(x, bits)).clamp(0, 1)
        return y + ((y * 255).round() / 255 - y).detach()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x - 0.5)


class StegaStampStep(Step):
    """Trains a :class:`StegaStamp` (the loop's model) in the core loop: random bit strings per batch,
    encode, round, decode; binary cross-entropy of the bits."""

    def __init__(self, bits: int):
        self.bits_per_image = bits

    def batch(self, x, y, index, generator):
        self.bits = torch.randint(0, 2, (len(x), self.bits_per_image), generator=generator,
                                  device=generator.device).to(x.device)
        return x, y

    def loss(self, model, x, y):
        logits = model.decode(model.stamp(x, self.bits))
        return F.binary_cross_entropy_with_logits(logits.float(), self.bits.float())


def train_stegastamp(images: Split, bits: int, epochs: int, seed: int, lr: float = 1e-3, batch_size: int = 64,
                     bound: float = 12 / 255, width: int = 16, progress: bool = False) -> StegaStamp:
    """A StegaStamp trained on ``images`` (uint8, on the device it trains on) for ``epochs``."""
    torch.manual_seed(seed)
    c, size = images.images.shape[1], images.images.shape[-1]
    net = StegaStamp(bits, c, size, width, bound).to(images.images.device)
    opt = Optim(epochs=epochs, lr=lr, batch_size=batch_size, schedule="cosine", optimizer="adam", weight_decay=0.0)
    return train(net, images, opt, seed=seed, step=StegaStampStep(bits), desc="StegaStamp", progress=progress)


@torch.no_grad()
def bit_accuracy(net: StegaStamp, images: torch.Tensor, bits: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(bit accuracy, PSNR in dB) of encoding ``bits`` (one string, or one per image) into uint8
    ``images`` and decoding them back, after rounding to uint8."""
    correct, sq, n = 0.0, 0.0, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 255
        b = bits.expand(len(x), -1) if bits.ndim == 1 else bits[start:start + batch_size]
        y = net.stamp(x, b)
        correct += float(((net.decode(y) > 0).long() == b).float().sum())
        sq += float(((y - x) ** 2).sum()) * 255 ** 2
        n += len(x)
    mse = sq / (n * images[0].numel())
    return correct / (n * net.bits), 10 * math.log10(255 ** 2 / max(mse, 1e-12))
