"""BiT (Kolesnikov et al. 2020, *Big Transfer (BiT): General Visual Representation Learning*): ResNet-v2 with
weight-standardised convolutions and GroupNorm, for CIFAR-10 at 32x32, as a qcompile model file.

The layout of google-research/big_transfer's ``bit_pytorch/models.py``, module for module and written the way it
is: ``StdConv2d`` standardises its weight in ``forward`` (``torch.var_mean`` over each filter, then
``(w - m) / sqrt(v + 1e-10)``) and calls ``F.conv2d``; ``root`` is a Sequential of ``conv`` (7x7 stride 2),
``pad`` (``nn.ConstantPad2d(1, 0)``) and ``pool`` (3x3 stride-2 max pool); ``body`` holds ``block1``-``block4``
of ``PreActBottleneck`` units named ``unit01``, ``unit02``, ... (``gn1``, ``conv1`` 1x1, ``gn2``, ``conv2`` 3x3
with the stride, ``gn3``, ``conv3`` 1x1, and a ``downsample`` 1x1 conv where the shape changes, which reads the
pre-activated input); ``head`` is ``gn``, ``relu``, ``avg`` (AdaptiveAvgPool2d(1)) and ``conv`` (a 1x1 conv with
bias), and ``forward`` asserts ``x.shape[-2:] == (1, 1)`` and returns ``x[..., 0, 0]``. GroupNorm has 32 groups
everywhere. A BiT-M-R50x1 checkpoint converted to PyTorch (``root.conv.weight``,
``body.block1.unit01.gn1.weight``, ...) loads into ``build_model(num_classes=21843, cifar=False)``:
23,500,352 parameters besides the classifier conv (BiT-M-R50x1, ``block_units=(3, 4, 6, 3)``, ``width_factor=1``).

What it exercises: weight standardisation (a computation on parameters alone, folded at capture so each
``StdConv2d`` is a conv on its standardised weight), GroupNorm (a float op between dequantize and quantize: there
is no BatchNorm to fold), a padding module before a max pool, pre-activation residuals, a shape assertion, and the
integer-indexed head.

Changed for 32x32 (``cifar=True``, the default): the root conv has stride 1 instead of 2 (the same 7x7 kernel and
parameters), so the blocks run at 16, 8, 4 and 2 pixels instead of 8, 4, 2 and 1; ``cifar=False`` gives BiT's
root. ``width`` scales ``width_factor`` channels (rounded to multiples of 32, the GroupNorm groups); BiT itself
has integer width factors 1, 2, 3, 4.

Untrained: the convs keep PyTorch's default initialisation from ``seed`` (standardisation makes their scale
irrelevant), and every GroupNorm gets seeded random affine parameters
(``qcompile.models.init.randomize_norm_affine``). Calibration and evaluation use the bundled CIFAR-10 sample
(``data/cifar10-sample.tar.gz``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_norm_affine

from cifar_sample import calibration_data, eval_data, example_input  # noqa: F401 (hooks)


class StdConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias, groups=groups)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=bias)


class PreActBottleneck(nn.Module):
    """Pre-activation (v2) bottleneck, with the stride on the 3x3 conv."""

    def __init__(self, cin: int, cout: int | None = None, cmid: int | None = None, stride: int = 1) -> None:
        super().__init__()
        cout = cout or cin
        cmid = cmid or cout // 4
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.gn1(x))
        residual = x
        if hasattr(self, "downsample"):
            residual = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


def _block(cin: int, cout: int, cmid: int, units: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        [("unit01", PreActBottleneck(cin=cin, cout=cout, cmid=cmid, stride=stride))]
        + [(f"unit{i:02d}", PreActBottleneck(cin=cout, cout=cout, cmid=cmid)) for i in range(2, units + 1)]))


class ResNetV2(nn.Module):
    """BiT's ResNet-v2; ``wf`` is the channel count of ``width_factor`` 1 times the width factor (64 at R50x1)."""

    def __init__(self, block_units: Sequence[int], wf: int, head_size: int = 21843, cifar: bool = True) -> None:
        super().__init__()
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, wf, kernel_size=7, stride=1 if cifar else 2, padding=3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        self.body = nn.Sequential(OrderedDict([
            ("block1", _block(wf, 4 * wf, wf, block_units[0], 1)),
            ("block2", _block(4 * wf, 8 * wf, 2 * wf, block_units[1], 2)),
            ("block3", _block(8 * wf, 16 * wf, 4 * wf, block_units[2], 2)),
            ("block4", _block(16 * wf, 32 * wf, 8 * wf, block_units[3], 2)),
        ]))
        self.head = nn.Sequential(OrderedDict([
            ("gn", nn.GroupNorm(32, 32 * wf)),
            ("relu", nn.ReLU(inplace=True)),
            ("avg", nn.AdaptiveAvgPool2d(output_size=1)),
            ("conv", nn.Conv2d(32 * wf, head_size, kernel_size=1, bias=True)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.body(self.root(x)))
        assert x.shape[-2:] == (1, 1)  # no spatial shape left
        return x[..., 0, 0]


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, cifar: bool = True,
                block_units: Sequence[int] = (3, 4, 6, 3), width_factor: int = 1) -> nn.Module:
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    wf = max(32, round(64 * width_factor * width / 32) * 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetV2(block_units, wf, head_size=num_classes, cifar=cifar)
    return randomize_norm_affine(model, seed).eval()
