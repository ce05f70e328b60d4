"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows ``torchvision.models.mobilenetv2`` module for module, so a torchvision state dict loads (the
parameters and their shapes are torchvision's; at ``num_classes=1000`` all 3,504,872 of them): ``features.0``
is the stem ``Conv2dNormActivation`` (``features.0.0`` Conv2d, ``.1`` BatchNorm2d, ``.2`` ReLU6),
``features.1``-``features.17`` are ``InvertedResidual`` blocks with their ``conv`` Sequential (expand 1x1 →
depthwise 3x3 → linear 1x1 + BatchNorm) and ``use_res_connect``, ``features.18`` the 1x1 head conv, then
``nn.functional.adaptive_avg_pool2d(x, (1, 1))``, ``torch.flatten(x, 1)`` and ``classifier`` (Dropout(0.2),
Linear) as in torchvision's ``_forward_impl``. ``width`` is torchvision's ``width_mult`` (channels rounded
with ``_make_divisible`` to multiples of 8; the head keeps 1280 below width 1).

Changed for 32x32 (``cifar=True``, the default): the stem conv has stride 1 instead of 2, and the second
stage (24 channels, ``features.2``) stride 1 instead of 2, the usual CIFAR adaptation (as in kuangliu's
pytorch-cifar), so the last feature map is 4x4 instead of 1x1. The names and shapes do not change;
``cifar=False`` gives torchvision's strides.

Untrained: the weights are drawn with torchvision's initialisation from ``seed``; every BatchNorm gets seeded
random affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running statistics it measures on
32 training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``), so that, as in a trained network,
each normalises what it really receives and folding and quantizing the model is a real test. Calibration and
evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)
from torchvision_layers import Conv2dNormActivation, _make_divisible, initialize_mobilenet


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # pw
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend([
            # dw
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            # pw-linear
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2, cifar: bool = False) -> None:
        super().__init__()
        input_channel = 32
        last_channel = 1280
        inverted_residual_setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [6, 24, 2, 1 if cifar else 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        # building first layer
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=1 if cifar else 2, activation_layer=nn.ReLU6)
        ]
        # building inverted residual blocks
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        # building last several layers
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        # building classifier
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        initialize_mobilenet(self)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        # Cannot use "squeeze" as batch-size can be 1
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, cifar: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MobileNetV2(num_classes=num_classes, width_mult=width, cifar=cifar)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
