"""Wide residual networks (Zagoruyko & Komodakis, 2016): the base architecture of the NAD paper.

This is the pre-activation WRN of the attention-transfer code, which the official NAD code copies:
a 3x3 stem with 16 channels, three groups of basic blocks with 16k, 32k and 64k channels (the
second and third downsample by 2), then BN-ReLU, global average pooling and a linear layer.
WRN-d-k has (d - 4) / 6 blocks per group, so the valid depths are 10, 16, 22, 28, ...

Attention is taken at the outputs of the three groups, ``block1``, ``block2`` and ``block3``:
(B, 16k, 32, 32), (B, 32k, 16, 16) and (B, 64k, 8, 8) for 32x32 inputs, before the final BN-ReLU,
as in the official code. The classifier ``fc`` takes the pooled output of the final BN-ReLU: the last
features, which fine-pruning prunes. Module and parameter names follow the official code too (``convShortcut``
included), so its checkpoints load with ``load_state_dict``.

Differences from the official code, none of which changes the function at 32x32: the pooling is
adaptive (so other image sizes work), ``forward`` returns only the logits (nadbench takes the
group outputs with forward hooks), and the ReLUs are not in-place (a hook keeps the tensor it saw).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nadbench import ModelSpec, hookimpl


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    When the channel count changes ("not equalInOut") the shortcut is a 1x1 conv applied to the
    *pre-activated* input, as in the official code; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (None if self.equalInOut else
                             nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equalInOut else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One group: ``n`` basic blocks, the first one changing channels and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 images (see the module docstring).

    ``num_classes`` comes first (unlike the official code) so that ``partial(WideResNet, depth=...)``
    is a builder that may be called positionally, ``build(10)``.
    """

    def __init__(self, num_classes: int = 10, depth: int = 16, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), "
                             f"got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        # The official initialisation: He-normal over fan-out for convs, BN at identity, zero biases
        # (the linear weight keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# (depth, widen factor): WRN-16-1 is the paper's model; the others are its teacher-student
# experiments' architectures and the usual CIFAR WRNs.
VARIANTS = [(16, 1), (16, 2), (40, 1), (40, 2), (10, 2), (28, 10)]


@hookimpl
def register_models(register):
    for depth, k in VARIANTS:
        register(ModelSpec(
            name=f"wrn-{depth}-{k}",
            build=partial(WideResNet, depth=depth, widen_factor=k),
            attention_layers=("block1", "block2", "block3"),
            classifier_layer="fc",  # its inputs: the pooled channels after the final BN-ReLU
            description=f"pre-activation WRN, depth {depth}, width x{k} (the NAD official code's network)",
        ))
