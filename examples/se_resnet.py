"""SE-ResNet-18 (Hu et al. 2018) in timm's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows timm's ``seresnet18`` (``timm.models.resnet``: ``ResNet`` with ``BasicBlock`` and
``attn_layer='se'``) module for module, so a timm state dict loads: ``conv1``, ``bn1``, ``act1``,
``maxpool``, ``layer1``-``layer4`` of ``BasicBlock`` (``conv1``, ``bn1``, ``act1``, ``conv2``, ``bn2``,
``se``, ``act2``, ``downsample`` = Sequential(conv1x1, BatchNorm2d)), ``global_pool``
(``SelectAdaptivePool2d``: ``pool`` + ``flatten``) and ``fc``. The ``se`` module is timm's ``SEModule``:
``x.mean((2, 3), keepdim=True)`` → ``fc1`` (1x1 conv, bias) → ``bn`` (Identity) → ``act`` (ReLU) → ``fc2``
(1x1 conv, bias) → ``gate`` (sigmoid), returning ``x * gate``; its reduced width is timm's
``make_divisible(channels / 16, 8)`` (8, 8, 16, 32 channels in the four stages).

Changed for 32x32 (``stem="cifar"``, the default): ``conv1`` is a 3x3 stride-1 conv instead of timm's 7x7
stride-2 one (the only shape that differs from timm's); the 3x3 stride-2 ``maxpool`` is kept, so the stages
run at 16, 8, 4 and 2 pixels (about 0.14 GMACs instead of 0.56 without it). ``stem="imagenet"`` gives timm's
stem and exactly its parameter shapes. ``width`` scales every stage's filters (64/128/256/512) and rounds to
multiples of 8 (timm's ResNet has no width multiplier; this is qcompile's ``scaled_channels`` rule).

Untrained: the weights are drawn with timm's initialisation from ``seed``; every BatchNorm gets seeded random
affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running statistics it measures on 32
training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``), so that, as in a trained network, each
normalises what it really receives and folding and quantizing the model is a real test. Calibration and
evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models import scaled_channels
from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)
from timm_layers import SelectAdaptivePool2d, make_divisible


class SEModule(nn.Module):
    """timm's SEModule (timm.layers.squeeze_excite) with its defaults: rd_ratio 1/16, divisor 8, no norm."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_divisor: int = 8) -> None:
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class BasicBlock(nn.Module):
    """timm's BasicBlock with ``attn_layer='se'`` (no drop block, anti-aliasing or drop path: all None)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        first_planes = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(first_planes, outplanes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outplanes)
        self.se = SEModule(outplanes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x


def downsample_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """timm's downsample_conv with kernel size 1: Sequential(Conv2d 1x1 strided, BatchNorm2d)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResNet(nn.Module):
    """timm's ResNet with the default (single-conv) stem, for BasicBlock networks."""

    def __init__(self, layers: list[int], num_classes: int = 1000, width: float = 1.0, stem: str = "imagenet",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        channels = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        inplanes = channels[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, blocks) in enumerate(zip(channels, layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * BasicBlock.expansion:
                downsample = downsample_conv(inplanes, planes * BasicBlock.expansion, stride)
            stage = [BasicBlock(inplanes, planes, stride, downsample)]
            inplanes = planes * BasicBlock.expansion
            stage += [BasicBlock(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = inplanes
        self.global_pool = SelectAdaptivePool2d()
        self.fc = nn.Linear(self.num_features, num_classes)
        # timm's init_weights
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, stem: str = "cifar") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet([2, 2, 2, 2], num_classes=num_classes, width=width, stem=stem)
    # (this also replaces the zeros timm's zero_init_last puts in each block's bn2.weight)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
