"""He et al.'s CIFAR ResNets (6n+2 layers: 3 stages of 16/32/64 filters) with projection shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.models.width import scaled_channels


class CifarBlock(nn.Module):
    """Basic block; a 1x1 conv + BN projects the shortcut when the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv 3x3 stem, three stages, global average pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [scaled_channels(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20_cifar(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters at width 1)."""
    return CifarResNet(20, num_classes=num_classes, width=width)


def resnet56_cifar(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters at width 1)."""
    return CifarResNet(56, num_classes=num_classes, width=width)
