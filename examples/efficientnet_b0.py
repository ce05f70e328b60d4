"""EfficientNet-B0 (Tan & Le 2019) in timm's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows timm's ``efficientnet_b0`` (``timm.models.efficientnet.EfficientNet``) module for module, so a timm
state dict loads (at ``num_classes=1000`` all 5,288,548 parameters, every shape timm's): ``conv_stem``,
``bn1``, ``act1``, ``blocks.i.j`` (seven stages: one ``DepthwiseSeparableConv`` with ``conv_dw``, ``bn1``,
``act1``, ``se``, ``conv_pw``, ``bn2``, ``act2``, then ``InvertedResidual`` blocks with ``conv_pw``,
``bn1``, ``act1``, ``conv_dw``, ``bn2``, ``act2``, ``se``, ``conv_pwl``, ``bn3``), each with a ``drop_path``
(``nn.Identity``: timm's drop path is 0 here and an identity in eval anyway), ``conv_head``, ``bn2``,
``act2``, ``global_pool`` (``SelectAdaptivePool2d``) and ``classifier``; timm's ``F.dropout`` of rate 0.2
before the classifier. ``se`` is timm's EfficientNet ``SqueezeExcite``: ``x.mean((2, 3), keepdim=True)`` →
``conv_reduce`` → ``act1`` (SiLU) → ``conv_expand`` → ``gate`` (sigmoid), returning ``x * gate``, reduced to a
quarter of the block's *input* channels as timm does. Symmetric static padding (timm's ``efficientnet_b0``,
not the ``tf_`` "same"-padding variants).

BatchNorm and activation are separate modules, as in timm before 0.6 (``bn1`` BatchNorm2d then ``act1``
SiLU); newer timm fuses them into ``BatchNormAct2d`` modules named ``bn1``, whose state dict keys are the same,
so either version's weights load. ``width`` is timm's ``channel_multiplier`` (``round_channels``: multiples
of 8, never 10% below; the stem and the 1280-channel head scale too) and ``depth`` its ``depth_multiplier``
(repeats rounded up).

Changed for 32x32 (``cifar=True``, the default): ``conv_stem`` has stride 1 instead of 2 (its shape does not
change), as in kuangliu's pytorch-cifar EfficientNetB0, so the stem and the seven stages run at 32; 32, 16, 8,
4, 4, 2, 2 pixels instead of timm's 112; 112 ... 7 at 224x224. Full B0 depth (16 blocks: at 32x32 it costs
only ~30 MMACs). ``cifar=False`` gives timm's stride.

Untrained: the weights are drawn with timm's ("goog") initialisation from ``seed``; every BatchNorm gets seeded
random affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running statistics it measures on
32 training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``), so that, as in a trained network,
each normalises what it really receives and folding and quantizing the model is a real test. Calibration and
evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)
from timm_layers import SelectAdaptivePool2d, make_divisible


# timm's efficientnet_b0 arch_def: block type, repeats, kernel, stride, expansion, output channels (SE 0.25)
ARCH = [
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
]
SE_RATIO = 0.25


def round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    """timm's round_channels (the EfficientNet builder's channel multiplier)."""
    if not multiplier:
        return channels
    return make_divisible(channels * multiplier, divisor)


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's symmetric static padding."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def create_conv2d(cin: int, cout: int, kernel_size: int, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=get_padding(kernel_size, stride),
                     groups=cin if depthwise else 1, bias=False)


class SqueezeExcite(nn.Module):
    """timm's EfficientNet SqueezeExcite (timm.models._efficientnet_blocks)."""

    def __init__(self, in_chs: int, rd_ratio: float = 0.25, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        rd_channels = round(in_chs * rd_ratio)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class DepthwiseSeparableConv(nn.Module):
    """timm's DepthwiseSeparableConv ('ds'): depthwise conv → BN → act → SE → pointwise conv → BN (no act)."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.25) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = create_conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, depthwise=True)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(in_chs, rd_ratio=se_ratio) if se_ratio else nn.Identity()
        self.conv_pw = create_conv2d(in_chs, out_chs, 1)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.Identity()  # no point-wise activation in EfficientNet
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        x = self.act2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """timm's InvertedResidual ('ir', MBConv): 1x1 expand, depthwise, SE, 1x1 project, each conv with a BN."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 exp_ratio: float = 1.0, se_ratio: float = 0.25) -> None:
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.has_skip = in_chs == out_chs and stride == 1
        self.conv_pw = create_conv2d(in_chs, mid_chs, 1)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride, depthwise=True)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = nn.SiLU(inplace=True)
        # timm (se_from_exp=False): SE channels from the block input, i.e. rd_ratio = se_ratio / exp_ratio
        self.se = SqueezeExcite(mid_chs, rd_ratio=se_ratio / exp_ratio) if se_ratio else nn.Identity()
        self.conv_pwl = create_conv2d(mid_chs, out_chs, 1)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.act2(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 1000, channel_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                 stem_stride: int = 2, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = round_channels(1280, channel_multiplier)
        self.drop_rate = drop_rate
        # Stem
        stem_size = round_channels(32, channel_multiplier)
        self.conv_stem = create_conv2d(3, stem_size, 3, stride=stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_size)
        self.act1 = nn.SiLU(inplace=True)
        # Middle stages (DS / IR blocks), as timm's EfficientNetBuilder lays them out
        in_chs = stem_size
        stages = []
        for kind, repeats, kernel, stride, exp, chs in ARCH:
            out_chs = round_channels(chs, channel_multiplier)
            blocks: list[nn.Module] = []
            for i in range(int(math.ceil(repeats * depth_multiplier))):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, kernel, s, se_ratio=SE_RATIO))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, s, exp_ratio=exp, se_ratio=SE_RATIO))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        # Head + Pooling
        self.conv_head = create_conv2d(in_chs, self.num_features, 1)
        self.bn2 = nn.BatchNorm2d(self.num_features)
        self.act2 = nn.SiLU(inplace=True)
        self.global_pool = SelectAdaptivePool2d()
        self.classifier = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            _init_weight_goog(m)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.blocks(x)
        x = self.conv_head(x)
        x = self.bn2(x)
        x = self.act2(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _init_weight_goog(m: nn.Module) -> None:
    """timm's _init_weight_goog (TensorFlow's EfficientNet initialisation, group-corrected fan-out)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        init_range = 1.0 / math.sqrt(m.weight.size(0))
        nn.init.uniform_(m.weight, -init_range, init_range)
        nn.init.zeros_(m.bias)


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, depth: float = 1.0,
                cifar: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EfficientNet(num_classes=num_classes, channel_multiplier=width, depth_multiplier=depth,
                             stem_stride=1 if cifar else 2)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
