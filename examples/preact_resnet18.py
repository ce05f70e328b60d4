"""Pre-activation ResNet-18 (He et al. 2016, *Identity Mappings in Deep Residual Networks*) for CIFAR-10.

The common CIFAR layout of kuangliu's pytorch-cifar ``PreActResNet18`` (``models/preact_resnet.py``),
module for module: ``conv1`` (3x3, stride 1), ``layer1``-``layer4`` of ``PreActBlock`` (``bn1``, ``conv1``,
``bn2``, ``conv2``, and a ``shortcut`` = Sequential(conv1x1) where the shape changes, taken from the
pre-activated input), ``linear``; ``forward`` is kuangliu's: ``out = F.relu(self.bn1(x))``, ...,
``F.avg_pool2d(out, 4)``, ``out.view(out.size(0), -1)``, ``self.linear(out)``.

One addition: the final BatchNorm + ReLU of He et al.'s pre-activation design (``bn``, then ``F.relu``
before the pooling), which kuangliu's file leaves out; ``final_bn=False`` removes it, and then a kuangliu
state dict loads exactly (with it, load one with ``strict=False``: only ``bn.*`` is missing). ``width``
scales the 64/128/256/512 filters, rounded to multiples of 8 (qcompile's ``scaled_channels``).

The point of this example: its BatchNorms follow no conv. Each block's ``bn1`` reads the residual sum (or,
in ``layer1.0``, the stem conv's output, which the identity shortcut also reads), and ``bn`` reads the last
sum, so they cannot be folded into a preceding conv; only ``bn2`` directly follows a conv.

Full size: about 0.56 GMACs at 32x32 (the largest of the example zoo).

Untrained: the weights are drawn with PyTorch's default initialisation (as kuangliu's) from ``seed``; every
BatchNorm gets seeded random affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running
statistics it measures on 32 training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``), so that,
as in a trained network, each normalises what it really receives and folding and quantizing the model is a real
test. Calibration and evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py``
does.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models import scaled_channels
from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


class PreActBlock(nn.Module):
    """Pre-activation version of the BasicBlock."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, block: type[PreActBlock], num_blocks: list[int], num_classes: int = 10,
                 width: float = 1.0, final_bn: bool = True) -> None:
        super().__init__()
        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, planes[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(planes[3] * block.expansion) if final_bn else None
        self.linear = nn.Linear(planes[3] * block.expansion, num_classes)

    def _make_layer(self, block: type[PreActBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        if self.bn is not None:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, final_bn: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, final_bn=final_bn)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
