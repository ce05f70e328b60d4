"""Pieces of timm (``timm.layers``) that its SE-ResNet and EfficientNet share, written as timm writes them so
that the example model files keep timm's module names (not a model file itself: they import it)."""

from __future__ import annotations

from torch import Tensor, nn


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding (timm.layers.helpers.make_divisible)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SelectAdaptivePool2d(nn.Module):
    """timm's SelectAdaptivePool2d(pool_type='avg', flatten=True): ``pool`` then ``flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_type = "avg"
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        x = self.flatten(x)
        return x
