"""ResNeXt-29 (Xie et al. 2017, *Aggregated Residual Transformations for Deep Neural Networks*) for CIFAR-10.

The layout of prlz77's ResNeXt.pytorch (``models/model.py``, the most used PyTorch CIFAR ResNeXt), module for
module and written the way it is: ``conv_1_3x3`` + ``bn_1``, three stages ``stage_1``-``stage_3`` of
``ResNeXtBottleneck`` blocks named ``stage_k_bottleneck_i`` (``conv_reduce`` 1x1, ``bn_reduce``, ``conv_conv``
3x3 grouped ``cardinality`` ways, ``bn``, ``conv_expand`` 1x1, ``bn_expand``, and a ``shortcut`` Sequential
holding ``shortcut_conv`` + ``shortcut_bn`` where the channels change), then ``F.avg_pool2d(x, 8, 1)``,
``x.view(-1, 1024)`` and ``classifier``. Its ``forward`` calls every submodule through ``.forward(x)``
(``self.conv_reduce.forward(x)``), which torch.fx does not record as a module call by itself; qcompile captures
it as one. A prlz77 checkpoint of the same configuration loads exactly (its older revisions, without
``base_width``, build the same modules at ``base_width=64``).

The original configuration is ResNeXt-29 8x64d (``cardinality=8, base_width=64, widen_factor=4``: 34.4M
parameters, 5.4 GMACs at 32x32). The default here is a CPU-sized 4x16d (``cardinality=4, base_width=16``: 3.2M
parameters, 0.49 GMACs), the same code with narrower groups.

Untrained: the convolutions are drawn with prlz77's Kaiming-normal (fan-out) initialisation from ``seed``; every
BatchNorm gets seeded random affine parameters and the running statistics it measures on 32 training images of
the bundled CIFAR-10 sample (``qcompile.models.init.randomize_batchnorm``), as in ``preact_resnet18.py``.
Calibration and evaluation use the same sample (``data/cifar10-sample.tar.gz``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck type C: 1x1 reduce, 3x3 grouped, 1x1 expand, projection shortcut when widening."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int, base_width: int,
                 widen_factor: int) -> None:
        super().__init__()
        width_ratio = out_channels / (widen_factor * 64.0)
        D = cardinality * int(base_width * width_ratio)
        self.conv_reduce = nn.Conv2d(in_channels, D, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(D)
        self.conv_conv = nn.Conv2d(D, D, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(D)
        self.conv_expand = nn.Conv2d(D, out_channels, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module("shortcut_conv", nn.Conv2d(in_channels, out_channels, kernel_size=1,
                                                                stride=stride, padding=0, bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        bottleneck = self.conv_reduce.forward(x)
        bottleneck = F.relu(self.bn_reduce.forward(bottleneck), inplace=True)
        bottleneck = self.conv_conv.forward(bottleneck)
        bottleneck = F.relu(self.bn.forward(bottleneck), inplace=True)
        bottleneck = self.conv_expand.forward(bottleneck)
        bottleneck = self.bn_expand.forward(bottleneck)
        residual = self.shortcut.forward(x)
        return F.relu(residual + bottleneck, inplace=True)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs: depth 9n+2, three stages of n bottlenecks at 64/128/256 x widen_factor."""

    def __init__(self, cardinality: int, depth: int, nlabels: int, base_width: int, widen_factor: int = 4) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.depth = depth
        self.block_depth = (self.depth - 2) // 9
        self.base_width = base_width
        self.widen_factor = widen_factor
        self.nlabels = nlabels
        self.output_size = 64
        self.stages = [64, 64 * self.widen_factor, 128 * self.widen_factor, 256 * self.widen_factor]

        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.stage_1 = self.block("stage_1", self.stages[0], self.stages[1], 1)
        self.stage_2 = self.block("stage_2", self.stages[1], self.stages[2], 2)
        self.stage_3 = self.block("stage_3", self.stages[2], self.stages[3], 2)
        self.classifier = nn.Linear(self.stages[3], nlabels)
        init.kaiming_normal_(self.classifier.weight)
        for key in self.state_dict():
            if key.split(".")[-1] == "weight":
                if "conv" in key:
                    init.kaiming_normal_(self.state_dict()[key], mode="fan_out")
                if "bn" in key:
                    self.state_dict()[key][...] = 1
            elif key.split(".")[-1] == "bias":
                self.state_dict()[key][...] = 0

    def block(self, name: str, in_channels: int, out_channels: int, pool_stride: int = 2) -> nn.Sequential:
        block = nn.Sequential()
        for bottleneck in range(self.block_depth):
            name_ = "%s_bottleneck_%d" % (name, bottleneck)
            if bottleneck == 0:
                block.add_module(name_, ResNeXtBottleneck(in_channels, out_channels, pool_stride, self.cardinality,
                                                          self.base_width, self.widen_factor))
            else:
                block.add_module(name_, ResNeXtBottleneck(out_channels, out_channels, 1, self.cardinality,
                                                          self.base_width, self.widen_factor))
        return block

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_1_3x3.forward(x)
        x = F.relu(self.bn_1.forward(x), inplace=True)
        x = self.stage_1.forward(x)
        x = self.stage_2.forward(x)
        x = self.stage_3.forward(x)
        x = F.avg_pool2d(x, 8, 1)
        x = x.view(-1, self.stages[3])
        return self.classifier(x)


def build_model(cardinality: int = 4, depth: int = 29, num_classes: int = 10, base_width: int = 16,
                widen_factor: int = 4, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CifarResNeXt(cardinality, depth, num_classes, base_width, widen_factor)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
