"""A small ConvNeXt (Liu et al. 2022) in torchvision's layout, for CIFAR-10 at 32x32, as a qcompile model file.

Follows ``torchvision.models.convnext`` module for module, so a torchvision state dict loads into the same
configuration (``cifar=False, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000`` is
``convnext_tiny``, all 28,589,128 parameters): ``features.0`` is the stem (``features.0.0`` a 4x4 stride-4
Conv2d, ``.1`` a ``LayerNorm2d``), ``features.1``, ``.3``, ``.5``, ``.7`` the stages of ``CNBlock``s, each with
its ``block`` Sequential (7x7 depthwise Conv2d ``0``, ``Permute`` to channels last ``1``, LayerNorm ``2``,
Linear ``3`` to 4x the channels, GELU ``4``, Linear ``5`` back, ``Permute`` to channels first ``6``), its
``layer_scale`` parameter (C, 1, 1) and ``stochastic_depth``, the forward ``layer_scale * block(x)`` plus the
input; ``features.2``, ``.4``, ``.6`` downsample (``LayerNorm2d``, 2x2 stride-2 Conv2d); then ``avgpool``
(AdaptiveAvgPool2d(1)) and ``classifier`` (``LayerNorm2d``, Flatten, Linear). ``LayerNorm2d`` is torchvision's:
``F.layer_norm`` over the channels of the permuted tensor, with the module's own weight and bias.

Small config for speed (the defaults): timm's ``convnext_atto`` widths and depths, ``dims=(40, 80, 160, 320)``,
``depths=(2, 2, 6, 2)`` (3,377,730 parameters at 10 classes, 44.7 MMACs at 32x32). ``width`` scales every stage's
channels (rounded to multiples of 8; torchvision has no width multiplier).

Changed for 32x32 (``cifar=True``, the default): the stem conv has stride 2 and padding 1 instead of stride 4
(the same 4x4 kernel and parameters), so the stages run at 16, 8, 4 and 2 pixels instead of 8, 4, 2 and 1;
``cifar=False`` gives torchvision's stem.

What it exercises: LayerNorm (a float op between dequantize and quantize), ``nn.Linear`` on channels-last 4-d
tensors (integer dense over the last axis), GELU (a table), permutes of codes, and the layer scale, which
``fold_bn`` folds into the Linear before it.

Untrained: the weights are drawn with torchvision's initialisation from ``seed``. Every LayerNorm gets seeded
random affine parameters (weight ~ U(0.5, 1.5), bias ~ N(0, 0.1²): torchvision's ones and zeros would make them
trivial), and every block's layer scale is measured on 32 training images of the bundled CIFAR-10 sample
(``cifar_sample.statistics_images``): per channel, a seeded U(0.25, 1) fraction of the spread of the block's input over the
spread of its branch, so that, as in a trained network, every residual branch contributes (torchvision's 1e-6
would make every block the identity). Calibration and evaluation use the same sample
(``data/cifar10-sample.tar.gz``), as ``resnet20_cifar.py`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompile.models.init import randomize_norm_affine

from cifar_sample import calibration_data, eval_data, example_input, statistics_images  # noqa: F401 (hooks)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's rounding of channel counts (models/_utils.py): nearest multiple, never 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: drops whole residual branches per sample ("row") while training."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        keep = 1.0 - self.p
        return x * torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims: Sequence[int], depths: Sequence[int], stochastic_depth_prob: float = 0.0,
                 layer_scale: float = 1e-6, num_classes: int = 1000, cifar: bool = False) -> None:
        super().__init__()
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=2 if cifar else 4, padding=1 if cifar else 0, bias=True),
            norm_layer(dims[0]),
        )]
        total_stage_blocks = sum(depths)
        stage_block_id = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * stage_block_id / (total_stage_blocks - 1.0)
                stage.append(CNBlock(dim, layer_scale, sd_prob))
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm_layer(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm_layer(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x


def build_model(width: float = 1.0, num_classes: int = 10, seed: int = 0, cifar: bool = True,
                dims: Sequence[int] = (40, 80, 160, 320), depths: Sequence[int] = (2, 2, 6, 2)) -> nn.Module:
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNeXt([_make_divisible(d * width) for d in dims], depths, num_classes=num_classes, cifar=cifar)
    randomize_norm_affine(model, seed)
    return measure_layer_scales(model, statistics_images(seed), seed).eval()


@torch.no_grad()
def measure_layer_scales(model: nn.Module, images: Tensor, seed: int = 0) -> nn.Module:
    """Each block's layer scale, set as ``images`` reach it: per channel, a seeded U(0.25, 1) fraction of the
    block input's standard deviation over that of the channel's branch output."""
    gen = torch.Generator().manual_seed(seed + 1)

    def set_scale(block: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        spread = block.block(x).std(dim=(0, 2, 3)).clamp_min(1e-12).reshape(-1, 1, 1)
        fraction = torch.rand(block.layer_scale.shape, generator=gen) * 0.75 + 0.25
        block.layer_scale.copy_(fraction * x.std() / spread)

    handles = [m.register_forward_pre_hook(set_scale) for m in model.modules() if isinstance(m, CNBlock)]
    mode = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(mode)
    return model
