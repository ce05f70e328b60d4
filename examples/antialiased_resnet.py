"""Anti-aliased ResNet-18 (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"), as a qcompile model
file.

Follows ``adobe/antialiased-cnns`` (``antialiased_cnns/resnet.py`` and ``blurpool.py``) module for module, so its
checkpoints' state dicts load, the filter buffers included: ``conv1``, ``bn1``, ``maxpool`` =
Sequential(MaxPool2d(2, stride 1), BlurPool), ``layer1``-``layer4`` of ``BasicBlock`` whose strided ``conv2`` is
Sequential(BlurPool, conv3x3) and whose strided ``downsample`` is Sequential(BlurPool, conv1x1, BatchNorm2d),
``avgpool`` and ``fc``. ``BlurPool`` is written as there: a reflection pad (``nn.ReflectionPad2d``, its default
``pad_type``), then ``F.conv2d`` with a fixed binomial filter buffer (``filt``, 4x4 by default) at stride 2 and
``groups=inp.shape[1]``; it has no parameters, so at 1000 classes the model has torchvision ResNet-18's
11,689,512.

Changed for 32x32 (``cifar=True``, the default): ``conv1`` is a 3x3 stride-1 conv instead of the 7x7 stride-2
one (the only shape that differs); the blurred max pool is kept, so the stages run at 16, 8, 4 and 2 pixels.
``cifar=False`` gives the original stem. Untrained: seeded weights with the repository's initialisation, then
seeded random BatchNorm affine parameters and statistics measured on 32 images of the bundled CIFAR-10 sample
(``qcompile.models.init.randomize_batchnorm``), as the other examples; calibration and evaluation use that sample.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


def get_pad_layer(pad_type: str) -> type[nn.Module]:
    if pad_type in ["refl", "reflect"]:
        return nn.ReflectionPad2d
    if pad_type in ["repl", "replicate"]:
        return nn.ReplicationPad2d
    if pad_type == "zero":
        return nn.ZeroPad2d
    raise ValueError(f"Pad type [{pad_type}] not recognized")


class BlurPool(nn.Module):
    """Low-pass filter, then subsample: ``blurpool.BlurPool`` with its binomial filters of size 1 to 7."""

    def __init__(self, channels: int, pad_type: str = "reflect", filt_size: int = 4, stride: int = 2,
                 pad_off: int = 0) -> None:
        super().__init__()
        self.filt_size = filt_size
        self.pad_off = pad_off
        self.pad_sizes = [int(1.0 * (filt_size - 1) / 2), int(np.ceil(1.0 * (filt_size - 1) / 2)),
                          int(1.0 * (filt_size - 1) / 2), int(np.ceil(1.0 * (filt_size - 1) / 2))]
        self.pad_sizes = [pad_size + pad_off for pad_size in self.pad_sizes]
        self.stride = stride
        self.off = int((self.stride - 1) / 2.0)
        self.channels = channels
        a = np.array({1: [1.0], 2: [1.0, 1.0], 3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0],
                      5: [1.0, 4.0, 6.0, 4.0, 1.0], 6: [1.0, 5.0, 10.0, 10.0, 5.0, 1.0],
                      7: [1.0, 6.0, 15.0, 20.0, 15.0, 6.0, 1.0]}[filt_size])
        filt = torch.Tensor(a[:, None] * a[None, :])
        filt = filt / torch.sum(filt)
        self.register_buffer("filt", filt[None, None, :, :].repeat((self.channels, 1, 1, 1)))
        self.pad = get_pad_layer(pad_type)(self.pad_sizes)

    def forward(self, inp: Tensor) -> Tensor:
        if self.filt_size == 1:
            if self.pad_off == 0:
                return inp[:, :, ::self.stride, ::self.stride]
            return self.pad(inp)[:, :, ::self.stride, ::self.stride]
        return F.conv2d(self.pad(inp), self.filt, stride=self.stride, groups=inp.shape[1])


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 filter_size: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1:
            self.conv2: nn.Module = conv3x3(planes, planes)
        else:
            self.conv2 = nn.Sequential(BlurPool(planes, filt_size=filter_size, stride=stride), conv3x3(planes, planes))
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """``antialiased_cnns.resnet.ResNet`` with basic blocks and ``pool_only=True`` (its default)."""

    def __init__(self, layers: list[int], num_classes: int = 1000, filter_size: int = 4, cifar: bool = True) -> None:
        super().__init__()
        self.inplanes = 64
        if cifar:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=1),
                                     BlurPool(self.inplanes, filt_size=filter_size, stride=2))
        self.layer1 = self._make_layer(64, layers[0], filter_size=filter_size)
        self.layer2 = self._make_layer(128, layers[1], stride=2, filter_size=filter_size)
        self.layer3 = self._make_layer(256, layers[2], stride=2, filter_size=filter_size)
        self.layer4 = self._make_layer(512, layers[3], stride=2, filter_size=filter_size)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m.in_channels != m.out_channels or m.out_channels != m.groups or m.bias is not None:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, filter_size: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            parts: list[nn.Module] = [BlurPool(filt_size=filter_size, stride=stride, channels=self.inplanes)] \
                if stride != 1 else []
            parts += [conv1x1(self.inplanes, planes * BasicBlock.expansion, 1),
                      nn.BatchNorm2d(planes * BasicBlock.expansion)]
            downsample = nn.Sequential(*parts)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, filter_size=filter_size)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, filter_size=filter_size))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def build_model(num_classes: int = 10, filter_size: int = 4, cifar: bool = True, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet([2, 2, 2, 2], num_classes=num_classes, filter_size=filter_size, cifar=cifar)
    images = [statistics_images(seed)] if cifar else None  # the original stem wants 224x224 images
    return randomize_batchnorm(model, seed, data=images).eval()
