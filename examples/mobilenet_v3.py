"""MobileNetV3-Small (Howard et al. 2019) in torchvision's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows ``torchvision.models.mobilenetv3`` module for module, so a torchvision state dict loads (the parameters
and their shapes are torchvision's ``mobilenet_v3_small``; at ``num_classes=1000`` all 2,542,856 of them):
``features.0`` is the stem ``Conv2dNormActivation`` (Conv2d, BatchNorm2d with torchvision's ``eps=0.001``,
Hardswish), ``features.1``-``features.11`` are ``InvertedResidual`` blocks whose ``block`` Sequential holds the
expand 1x1 (where the expansion differs from the input), the depthwise kxk, torchvision's
``SqueezeExcitation`` (``avgpool`` → ``fc1`` → ReLU → ``fc2`` → Hardsigmoid, the scale multiplied into the
input: ``scale * input``) and the linear 1x1 projection, with the residual added in place (``result +=
input``); ``features.12`` is the 1x1 head conv to 576 channels, then ``avgpool``, ``torch.flatten(x, 1)`` and
``classifier`` (Linear(576, 1024), Hardswish, Dropout(0.2), Linear). Squeeze channels are
``_make_divisible(expanded // 4, 8)`` as in torchvision.

The constructs it adds to the zoo: Hardswish everywhere after the third block and a Hardsigmoid gate, each an
activation table in the integer IR (a float ``HardSwish`` / ``HardSigmoid`` between DQ and Q in ONNX where
onnxruntime computes the same codes), and a gate multiplied into a feature map.

Changed for 32x32 (``cifar=True``, the default): the stem conv and the first block have stride 1 instead of 2, so
the last feature map is 2x2 instead of 1x1. The names and shapes do not change; ``cifar=False`` gives
torchvision's strides.

Untrained: the weights are drawn with torchvision's initialisation from ``seed``; every BatchNorm gets seeded
random affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running statistics it measures on
32 training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``). Calibration and
evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)
from torchvision_layers import Conv2dNormActivation, _make_divisible, initialize_mobilenet


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class InvertedResidualConfig:
    """One block of torchvision's ``inverted_residual_setting``."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int, out_channels: int, use_se: bool,
                 activation: str, stride: int, dilation: int) -> None:
        self.input_channels = input_channels
        self.kernel = kernel
        self.expanded_channels = expanded_channels
        self.out_channels = out_channels
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation


class InvertedResidual(nn.Module):
    def __init__(self, cnf: InvertedResidualConfig, norm_layer: Callable[[int], nn.Module],
                 se_layer: Callable[..., nn.Module] = partial(SqueezeExcitation, scale_activation=nn.Hardsigmoid)):
        super().__init__()
        if not (1 <= cnf.stride <= 2):
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        if cnf.expanded_channels != cnf.input_channels:  # expand
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=activation_layer))
        stride = 1 if cnf.dilation > 1 else cnf.stride  # depthwise
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel,
                                           stride=stride, groups=cnf.expanded_channels, norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        if cnf.use_se:
            layers.append(se_layer(cnf.expanded_channels, _make_divisible(cnf.expanded_channels // 4, 8)))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,  # project
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


def small_setting(cifar: bool) -> list[InvertedResidualConfig]:
    """torchvision's ``_mobilenet_v3_conf("mobilenet_v3_small")`` (the first block at stride 1 for CIFAR)."""
    c = InvertedResidualConfig
    return [
        c(16, 3, 16, 16, True, "RE", 1 if cifar else 2, 1),
        c(16, 3, 72, 24, False, "RE", 2, 1),
        c(24, 3, 88, 24, False, "RE", 1, 1),
        c(24, 5, 96, 40, True, "HS", 2, 1),
        c(40, 5, 240, 40, True, "HS", 1, 1),
        c(40, 5, 240, 40, True, "HS", 1, 1),
        c(40, 5, 120, 48, True, "HS", 1, 1),
        c(48, 5, 144, 48, True, "HS", 1, 1),
        c(48, 5, 288, 96, True, "HS", 2, 1),
        c(96, 5, 576, 96, True, "HS", 1, 1),
        c(96, 5, 576, 96, True, "HS", 1, 1),
    ]


class MobileNetV3(nn.Module):
    def __init__(self, inverted_residual_setting: list[InvertedResidualConfig], last_channel: int,
                 num_classes: int = 1000, dropout: float = 0.2, cifar: bool = False) -> None:
        super().__init__()
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(3, first, kernel_size=3, stride=1 if cifar else 2,
                                                        norm_layer=norm_layer, activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(cnf, norm_layer) for cnf in inverted_residual_setting]
        last_in = inverted_residual_setting[-1].out_channels
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        initialize_mobilenet(self)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def build_model(num_classes: int = 10, seed: int = 0, cifar: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MobileNetV3(small_setting(cifar), 1024, num_classes=num_classes, cifar=cifar)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
