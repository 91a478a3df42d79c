"""PreAct-ResNet-18 for 32x32 images: BackdoorBench's default architecture.

The usual CIFAR variant (He et al., "Identity Mappings in Deep Residual Networks", as in
kuangliu/pytorch-cifar and BackdoorBench): a 3x3 stem with 64 channels and no max-pool, four
stages of two pre-activation basic blocks with 64/128/256/512 channels and strides 1/2/2/2,
global average pooling and a linear layer. Like those versions it has no BN-ReLU after the last
stage, and its module names match theirs, so BackdoorBench checkpoints load with
``load_state_dict`` and results stay comparable with its tables.

Attention layers are ``layer2``, ``layer3`` and ``layer4``: 16x16, 8x8 and 4x4 maps for 32x32
inputs. BackdoorBench distils the 1x1 pooled output as its third layer; a 1x1 map normalises to
1 for every input, so that NAD term is always zero. We never use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nadbench import ModelSpec, hookimpl


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 conv on the pre-activated input when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = self.shortcut(act) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation ResNet of basic blocks; ``num_blocks`` per stage ([2, 2, 2, 2]: ResNet-18)."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        in_planes, stages = 64, []
        for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes)


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="preact-resnet18",
        build=preact_resnet18,
        attention_layers=("layer2", "layer3", "layer4"),
        classifier_layer="linear",
        description="PreAct-ResNet-18 for 32x32 inputs (BackdoorBench's default model)",
    ))
