"""ShuffleNetV2 x1.0 (Ma et al. 2018) in torchvision's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows ``torchvision.models.shufflenetv2`` module for module, so a torchvision state dict loads (at
``num_classes=1000`` all 2,278,604 parameters of ``shufflenet_v2_x1_0``, every shape torchvision's):
``conv1`` (Sequential: Conv2d, BatchNorm2d, ReLU), ``maxpool``, ``stage2``-``stage4`` of
``InvertedResidual`` (``branch1`` / ``branch2`` Sequentials; stride 1 splits the input with
``x.chunk(2, dim=1)``, stride 2 feeds both branches; ``torch.cat`` then ``channel_shuffle(out, 2)``, written
as torchvision writes it: ``batchsize, num_channels, height, width = x.size()``, ``view`` →
``torch.transpose(x, 1, 2)`` → ``contiguous`` → ``view``), ``conv5``, ``x.mean([2, 3])``, ``fc``.

``width`` picks torchvision's stage channels: 0.5, 1.0, 1.5 and 2.0 are its x0.5 ... x2.0 models
(``[24, 48, 96, 192, 1024]`` ... ``[24, 244, 488, 976, 2048]``); any other multiplier scales x1.0's stages
(116 / 232 / 464) to the nearest even count (a stage splits its channels in two), keeping the 24-channel
stem and the 1024-channel ``conv5``.

Changed for 32x32 (``cifar=True``, the default): ``conv1`` has stride 1 instead of 2 (same shape) and
``maxpool`` is an ``nn.Identity`` instead of a 3x3 stride-2 max pool (it has no parameters), as in
kuangliu's pytorch-cifar ShuffleNetV2, so the stages run at 16, 8 and 4 pixels. ``cifar=False`` gives
torchvision's stem.

Untrained: the weights are drawn with PyTorch's default initialisation (torchvision does no custom one here) from
``seed``; every BatchNorm gets seeded random affine parameters (``qcompile.models.init.randomize_batchnorm``) and
the running statistics it measures on 32 training images of the bundled CIFAR-10 sample
(``cifar_sample.statistics_images``), so that, as in a trained network, each normalises what it really receives and folding
and quantizing the model is a real test. Calibration and evaluation use the same sample
(``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


# torchvision's shufflenet_v2_x{0_5,1_0,1_5,2_0}
STAGES_REPEATS = [4, 8, 4]
STAGES_OUT_CHANNELS = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)

    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, num_channels, height, width)

    return x


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not (1 <= stride <= 3):
            raise ValueError("illegal stride value")
        self.stride = stride

        branch_features = oup // 2
        if (self.stride == 1) and (inp != branch_features << 1):
            raise ValueError(
                f"Invalid combination of stride {stride}, inp {inp} and oup {oup} values. If stride == 1 then inp "
                "should be equal to oup // 2 << 1."
            )

        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()

        self.branch2 = nn.Sequential(
            nn.Conv2d(
                inp if (self.stride > 1) else branch_features,
                branch_features,
                kernel_size=1,
                stride=1,
                padding=0,
                bias=False,
            ),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0,
                       bias: bool = False) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)

        out = channel_shuffle(out, 2)

        return out


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int], num_classes: int = 1000,
                 cifar: bool = False) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels

        input_channels = 3
        output_channels = self._stage_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 3, 1 if cifar else 2, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels

        self.maxpool: nn.Module = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Static annotations for mypy
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        stage_names = [f"stage{i}" for i in [2, 3, 4]]
        for name, repeats, output_channels in zip(stage_names, stages_repeats, self._stage_out_channels[1:]):
            seq = [InvertedResidual(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(InvertedResidual(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels

        output_channels = self._stage_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )

        self.fc = nn.Linear(output_channels, num_classes)

    def _forward_impl(self, x: Tensor) -> Tensor:
        # See note [TorchScript super()]
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def stage_channels(width: float) -> list[int]:
    """torchvision's channels for its four widths; other multipliers scale x1.0's stages to even counts."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    if width in STAGES_OUT_CHANNELS:
        return list(STAGES_OUT_CHANNELS[width])
    base = STAGES_OUT_CHANNELS[1.0]
    return [base[0], *(max(2, 2 * round(c * width / 2)) for c in base[1:4]), base[4]]


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, cifar: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShuffleNetV2(STAGES_REPEATS, stage_channels(width), num_classes=num_classes, cifar=cifar)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
