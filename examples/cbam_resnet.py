"""ResNet with CBAM or BAM attention (Woo et al. 2018; Park et al. 2018), as a qcompile model file.

Follows ``Jongchan/attention-module`` (``MODELS/model_resnet.py``, ``cbam.py``, ``bam.py``) module for module, so
its checkpoints' state dicts load: ``conv1``, ``bn1``, ``layer1``-``layer4`` of ``BasicBlock`` / ``Bottleneck``
(``conv1``, ``bn1``, ``conv2``, ``bn2`` [, ``conv3``, ``bn3``], ``downsample`` = Sequential(conv1x1, BatchNorm2d),
``cbam``), ``bam1``-``bam3`` after the first three stages with ``att_type="BAM"``, and ``fc``. The code is
written as there: CBAM's channel gate runs one MLP (``Flatten`` → ``Linear`` → ``ReLU`` → ``Linear``, with
biases) on ``F.avg_pool2d`` and on ``F.max_pool2d`` over the whole map (windows from ``x.size(2)``,
``x.size(3)``), sums the two, and gates with ``F.sigmoid(...).unsqueeze(2).unsqueeze(3).expand_as(x)``; its
spatial gate concatenates ``torch.max(x, 1)[0]`` and ``torch.mean(x, 1)`` (``ChannelPool``), then a 7x7
``BasicConv`` (conv + BatchNorm, no ReLU) and a sigmoid. BAM multiplies a channel gate (MLP with BatchNorm1d)
by a spatial gate (1x1 reduce, two dilated 3x3 convs, 1x1 to one channel), both ``expand_as`` the input, and
scales the input by ``1 + sigmoid`` of the product.

``network_type="CIFAR10"`` (the default) is the repository's CIFAR configuration: a 3x3 stride-1 ``conv1``,
no max pool, ``F.avg_pool2d(x, 4)`` before ``fc``; ``"ImageNet"`` gives its 7x7 stem, max pool and
``nn.AvgPool2d(7)``, with exactly its parameter shapes (ResNet-18 + CBAM at 1000 classes: 11,779,392
parameters, 28,089,624 at depth 50, as the paper's 11.78M and 28.09M).

Untrained: seeded weights with the repository's initialisation (Kaiming ``fan_out`` for convs, every BatchNorm
weight 1 and the spatial gates' 0), then seeded random BatchNorm affine parameters and statistics measured on
32 images of the bundled CIFAR-10 sample (``qcompile.models.init.randomize_batchnorm``), as the other examples
do; calibration and evaluation use that sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


class BasicConv(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, relu: bool = True, bn: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    """CBAM's channel attention: one MLP on the average- and the max-pooled features."""

    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types: tuple[str, ...] = ("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = pool_types

    def forward(self, x: Tensor) -> Tensor:
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                avg_pool = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(avg_pool)
            elif pool_type == "max":
                max_pool = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(max_pool)
            if channel_att_sum is None:
                channel_att_sum = channel_att_raw
            else:
                channel_att_sum = channel_att_sum + channel_att_raw
        scale = F.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    """CBAM's spatial attention: max and mean over the channels, a 7x7 conv, a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        x_compress = self.compress(x)
        x_out = self.spatial(x_compress)
        scale = F.sigmoid(x_out)  # broadcasting
        return x * scale


class CBAM(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types: tuple[str, ...] = ("avg", "max"),
                 no_spatial: bool = False) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out


class BAMChannelGate(nn.Module):
    """BAM's channel attention (``bam.ChannelGate``): an MLP with BatchNorm1d on the average-pooled features."""

    def __init__(self, gate_channel: int, reduction_ratio: int = 16, num_layers: int = 1) -> None:
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        gate_channels = [gate_channel] + [gate_channel // reduction_ratio] * num_layers + [gate_channel]
        for i in range(len(gate_channels) - 2):
            self.gate_c.add_module("gate_c_fc_%d" % i, nn.Linear(gate_channels[i], gate_channels[i + 1]))
            self.gate_c.add_module("gate_c_bn_%d" % (i + 1), nn.BatchNorm1d(gate_channels[i + 1]))
            self.gate_c.add_module("gate_c_relu_%d" % (i + 1), nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(gate_channels[-2], gate_channels[-1]))

    def forward(self, in_tensor: Tensor) -> Tensor:
        avg_pool = F.avg_pool2d(in_tensor, in_tensor.size(2), stride=in_tensor.size(2))
        return self.gate_c(avg_pool).unsqueeze(2).unsqueeze(3).expand_as(in_tensor)


class BAMSpatialGate(nn.Module):
    """BAM's spatial attention (``bam.SpatialGate``): 1x1 reduce, dilated 3x3 convs, 1x1 to one channel."""

    def __init__(self, gate_channel: int, reduction_ratio: int = 16, dilation_conv_num: int = 2,
                 dilation_val: int = 4) -> None:
        super().__init__()
        reduced = gate_channel // reduction_ratio
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(gate_channel, reduced, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(reduced))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            self.gate_s.add_module("gate_s_conv_di_%d" % i, nn.Conv2d(reduced, reduced, kernel_size=3,
                                                                    padding=dilation_val, dilation=dilation_val))
            self.gate_s.add_module("gate_s_bn_di_%d" % i, nn.BatchNorm2d(reduced))
            self.gate_s.add_module("gate_s_relu_di_%d" % i, nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(reduced, 1, kernel_size=1))

    def forward(self, in_tensor: Tensor) -> Tensor:
        return self.gate_s(in_tensor).expand_as(in_tensor)


class BAM(nn.Module):
    def __init__(self, gate_channel: int) -> None:
        super().__init__()
        self.channel_att = BAMChannelGate(gate_channel)
        self.spatial_att = BAMSpatialGate(gate_channel)

    def forward(self, in_tensor: Tensor) -> Tensor:
        att = 1 + F.sigmoid(self.channel_att(in_tensor) * self.spatial_att(in_tensor))
        return att * in_tensor


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class _Block(nn.Module):
    """What both block kinds do after their convs, as the repository's blocks do: the shortcut, CBAM on the
    residual branch, the in-place add and the ReLU."""

    downsample: nn.Module | None
    cbam: CBAM | None
    relu: nn.ReLU

    def join(self, out: Tensor, x: Tensor) -> Tensor:
        residual = x
        if self.downsample is not None:
            residual = self.downsample(x)
        if self.cbam is not None:
            out = self.cbam(out)
        out += residual
        return self.relu(out)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_cbam: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.cbam = CBAM(planes, 16) if use_cbam else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.join(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_cbam: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.cbam = CBAM(planes * 4, 16) if use_cbam else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.join(self.bn3(self.conv3(out)), x)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], network_type: str, num_classes: int,
                 att_type: str | None = None) -> None:
        super().__init__()
        self.inplanes = 64
        self.network_type = network_type
        if network_type == "ImageNet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.avgpool = nn.AvgPool2d(7)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        if att_type == "BAM":
            self.bam1 = BAM(64 * block.expansion)
            self.bam2 = BAM(128 * block.expansion)
            self.bam3 = BAM(256 * block.expansion)
        else:
            self.bam1, self.bam2, self.bam3 = None, None, None
        self.layer1 = self._make_layer(block, 64, layers[0], att_type=att_type)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, att_type=att_type)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, att_type=att_type)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, att_type=att_type)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        nn.init.kaiming_normal_(self.fc.weight)
        for key in self.state_dict():
            if key.split(".")[-1] == "weight":
                if "conv" in key:
                    nn.init.kaiming_normal_(self.state_dict()[key], mode="fan_out")
                if "bn" in key:
                    self.state_dict()[key][...] = 0 if "SpatialGate" in key else 1
            elif key.split(".")[-1] == "bias":
                self.state_dict()[key][...] = 0

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1,
                    att_type: str | None = None) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, use_cbam=att_type == "CBAM")]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, use_cbam=att_type == "CBAM"))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        if self.network_type == "ImageNet":
            x = self.maxpool(x)
        x = self.layer1(x)
        if self.bam1 is not None:
            x = self.bam1(x)
        x = self.layer2(x)
        if self.bam2 is not None:
            x = self.bam2(x)
        x = self.layer3(x)
        if self.bam3 is not None:
            x = self.bam3(x)
        x = self.layer4(x)
        if self.network_type == "ImageNet":
            x = self.avgpool(x)
        else:
            x = F.avg_pool2d(x, 4)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def ResidualNet(network_type: str, depth: int, num_classes: int, att_type: str | None) -> ResNet:
    """The repository's constructor: depth 18, 34 (basic blocks), 50 or 101 (bottlenecks)."""
    if network_type not in ("ImageNet", "CIFAR10", "CIFAR100"):
        raise ValueError("network type should be ImageNet or CIFAR10 / CIFAR100")
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
    if depth not in layers:
        raise ValueError("network depth should be 18, 34, 50 or 101")
    return ResNet(BasicBlock if depth < 50 else Bottleneck, layers[depth], network_type, num_classes, att_type)


def build_model(network_type: str = "CIFAR10", depth: int = 18, num_classes: int = 10, att_type: str = "CBAM",
                seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidualNet(network_type, depth, num_classes, att_type)
    images = None if network_type == "ImageNet" else [statistics_images(seed)]  # its AvgPool2d(7) needs 224x224
    return randomize_batchnorm(model, seed, data=images).eval()
