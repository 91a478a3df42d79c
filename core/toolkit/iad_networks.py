"""Trigger networks that attacks learn together with the classifier: the encoder-decoder of IAD
(Nguyen & Tran, NeurIPS 2020), which maps an image to its own trigger pattern, and its one-channel
variant, the mask network. Shared core code, for IAD and for later generator-based attacks (LIRA).

The architecture follows the official ``networks/models.py`` and ``networks/blocks.py``
(VinAIResearch/input-aware-backdoor-attack-release): for CIFAR-10 32 channels and three levels,
down 32-64-128 (two 3x3 conv-BN-ReLU blocks, then a 2x2 max-pool, per level), a middle block, up
128-64-32 (bilinear x2, two blocks) and a last block without ReLU, then ``tanh / (2 + eps) + 0.5``.
BatchNorm momentum 0.05 as there; modules are named as there, so the state-dict keys match.
Inputs here are float images in [0, 1] (the official code feeds CIFAR-normalised ones; the first
conv-BN block absorbs that affine change of input).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

EPSILON = 1e-7  # the official code's: keeps the output strictly inside (0, 1)


def conv_block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """3x3 convolution, BatchNorm (momentum 0.05) and, unless ``relu`` is False, a ReLU."""
    layers = OrderedDict(conv2d=nn.Conv2d(c_in, c_out, 3, padding=1),
                         batch_norm=nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.05))
    if relu:
        layers["relu"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class IADGenerator(nn.Sequential):
    """IAD's pattern generator: float images (N, C, H, W) in [0, 1] -> patterns (N, out, H, W) in
    (0, 1). H and W must be divisible by ``2 ** depth``. ``width`` 32 and ``depth`` 3 are the
    official CIFAR-10 / GTSRB setting (MNIST: 16 and 2)."""

    def __init__(self, channels: int = 3, out_channels: int | None = None, width: int = 32, depth: int = 3):
        super().__init__()
        self.depth = depth
        widths = [width * 2 ** i for i in range(depth)]
        prev = channels
        for i, w in enumerate(widths):
            self.add_module(f"convblock_down_{2 * i}", conv_block(prev, w))
            self.add_module(f"convblock_down_{2 * i + 1}", conv_block(w, w))
            self.add_module(f"downsample_{i}", nn.MaxPool2d(2))
            prev = w
        self.add_module("convblock_middle", conv_block(prev, prev))
        for i, w in enumerate(reversed(widths)):
            last = i == depth - 1
            self.add_module(f"upsample_{i}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * i}", conv_block(w, w))
            self.add_module(f"convblock_up_{2 * i + 1}",
                            conv_block(w, out_channels or channels if last else w // 2, relu=not last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = 2 ** self.depth
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(f"IAD generator: image size {tuple(x.shape[-2:])} is not divisible by {side}")
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


class MaskGenerator(IADGenerator):
    """IAD's mask network: the generator with one output channel, followed by the official soft
    threshold ``tanh(20 v - 10) / (2 + eps) + 0.5``, which pushes each pixel's mask towards 0 or 1
    (about 0.5 is the switch). Output (N, 1, H, W) in (0, 1)."""

    def __init__(self, channels: int = 3, width: int = 32, depth: int = 3):
        super().__init__(channels, 1, width, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x) * 20 - 10) / (2 + EPSILON) + 0.5
