"""CIFAR-10 ResNet-20 (He et al., 3 stages of 16/32/64 filters, projection shortcuts) as a qcompile model file.

    qcompile examples/resnet20_cifar.py --recipe mostly4bit
"""

import torch

from qcompile.models import resnet20_cifar


def build_model(width: float = 1.0, num_classes: int = 10) -> torch.nn.Module:
    return resnet20_cifar(num_classes=num_classes, width=width)


def example_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)
