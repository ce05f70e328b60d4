"""ResNet-18 in torchvision's layout (a torchvision state dict loads) as a qcompile model file.

ImageNet stem at 224x224 by default; `--model-arg stem=cifar` gives the 3x3 CIFAR stem at 32x32.
"""

import torch

from qcompile.models import resnet18

_STEM = {"imagenet": 224, "cifar": 32}
_stem = "imagenet"


def build_model(width: float = 1.0, stem: str = "imagenet", num_classes: int | None = None) -> torch.nn.Module:
    global _stem
    if stem not in _STEM:
        raise ValueError(f"stem must be one of {sorted(_STEM)}, got {stem!r}")
    _stem = stem
    classes = num_classes if num_classes is not None else (1000 if stem == "imagenet" else 10)
    return resnet18(num_classes=classes, width=width, stem=stem)  # type: ignore[arg-type]


def example_input() -> torch.Tensor:
    size = _STEM[_stem]
    return torch.randn(1, 3, size, size)
