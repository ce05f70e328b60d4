"""Reference CNN definitions used by the example model files and the tests."""

from qcompile.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from qcompile.models.resnet_cifar import CifarResNet, resnet20_cifar, resnet56_cifar
from qcompile.models.width import scaled_channels

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "resnet18",
    "resnet20_cifar",
    "resnet50",
    "resnet56_cifar",
    "scaled_channels",
]
