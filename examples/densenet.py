"""A small DenseNet-BC (Huang et al. 2017) in torchvision's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows ``torchvision.models.densenet`` module for module, so a torchvision state dict loads into the same
configuration (``stem="imagenet", growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
num_classes=1000`` is ``densenet121``, all 7,978,856 parameters): ``features`` holds ``conv0``, ``norm0``,
``relu0``, ``pool0``, then ``denseblock1`` (``denselayer1`` ... with ``norm1``, ``relu1``, ``conv1``
(1x1, ``bn_size * growth_rate`` filters), ``norm2``, ``relu2``, ``conv2`` (3x3, ``growth_rate``)), each
``_DenseLayer`` concatenating all earlier features with ``torch.cat`` and each ``_DenseBlock`` returning the
concatenation of its input and every layer's output, ``transition1`` (``norm``, ``relu``, ``conv`` halving
the channels: the "C" of BC, ``pool`` = AvgPool2d(2, 2)), ..., ``norm5``; then ``classifier``. The forward
ends as torchvision's: ``F.relu(features, inplace=True)``, ``F.adaptive_avg_pool2d(out, (1, 1))``,
``torch.flatten(out, 1)``. (torchvision's memory-efficient checkpointing path is left out: it only applies
when training with ``memory_efficient=True``.)

Small config for speed (the defaults): growth rate 12, three dense blocks of 4 layers, 24 initial features,
bottleneck width 4 (DenseNet-BC-40-style widths with 4 instead of 6 layers per block: 90 channels at
``norm5``, about 43 MMACs at 32x32). ``width`` scales the growth rate and the initial features (to the
nearest integer, at least 1; torchvision has no width multiplier).

Changed for 32x32 (``stem="cifar"``, the default): Huang et al.'s CIFAR stem, ``conv0`` a 3x3 stride-1 conv
and ``pool0`` an ``nn.Identity`` (no parameters) instead of the 7x7 stride-2 conv and 3x3 stride-2 max pool,
so the blocks run at 32, 16 and 8 pixels. ``stem="imagenet"`` gives torchvision's stem.

Every BatchNorm here except ``norm0`` and the layers' ``norm2`` reads a concatenation, not a conv, so it
cannot be folded into a preceding conv.

Untrained: the weights are drawn with torchvision's initialisation from ``seed``; every BatchNorm gets seeded
random affine parameters (``qcompile.models.init.randomize_batchnorm``) and the running statistics it measures on
32 training images of the bundled CIFAR-10 sample (``cifar_sample.statistics_images``), so that, as in a trained network,
each normalises what it really receives and folding and quantizing the model is a real test. Calibration and
evaluation use the same sample (``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_batchnorm

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input

        bottleneck_output = self.bn_function(prev_features)

        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
            )
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 stem: str = "imagenet") -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")

        # First convolution
        if stem == "imagenet":
            conv0 = nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
            pool0: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            conv0 = nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
            pool0 = nn.Identity()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", conv0),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", pool0),
                ]
            )
        )

        # Each denseblock
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
            )
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, growth_rate: int = 12,
                block_config: tuple[int, ...] = (4, 4, 4), num_init_features: int = 24, bn_size: int = 4,
                stem: str = "cifar") -> nn.Module:
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenseNet(growth_rate=max(1, round(growth_rate * width)), block_config=tuple(block_config),
                         num_init_features=max(1, round(num_init_features * width)), bn_size=bn_size,
                         num_classes=num_classes, stem=stem)
    return randomize_batchnorm(model, seed, data=[statistics_images(seed)]).eval()
