"""CIFAR ResNet-18 (torchvision layout with the 3x3 CIFAR stem and no max-pool) at 32x32: the sweep's model.

    qcompile sweep examples/resnet18_cifar.py --data ../shared/data/cifar10-jpeg.tar.gz --epochs 30
"""

import torch

from qcompile.models import resnet18


def build_model(width: float = 1.0, num_classes: int = 10) -> torch.nn.Module:
    return resnet18(num_classes=num_classes, width=width, stem="cifar")


def example_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)
