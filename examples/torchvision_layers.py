"""Pieces of torchvision that its MobileNetV2 and MobileNetV3 share, written as torchvision writes them so that the
example model files keep torchvision's module names (not a model file itself: they import it)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's rounding of channel counts (models/_utils.py): nearest multiple, never 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: Conv2d (no bias) ``0``, norm ``1``, activation ``2`` if any."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
                                   norm_layer(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = cout


def initialize_mobilenet(model: nn.Module) -> None:
    """torchvision's weight initialisation of its MobileNets: Kaiming-normal convs (fan out), unit norms, N(0, 0.01)
    linear layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
