"""What resnet18.py and resnet50.py share: a torchvision-layout ResNet as a model file, with the ImageNet stem at
224x224 or, with ``--model-arg stem=cifar``, the 3x3 CIFAR stem at 32x32 (the example input follows the stem)."""

from collections.abc import Callable

import torch

_SIZE = {"imagenet": 224, "cifar": 32}


def model_file(constructor: Callable[..., torch.nn.Module]) -> tuple[Callable[..., torch.nn.Module],
                                                                     Callable[[], torch.Tensor]]:
    """``build_model`` and ``example_input`` for one of :mod:`qcompile.models`' torchvision ResNets."""
    built = {"stem": "imagenet"}

    def build_model(width: float = 1.0, stem: str = "imagenet", num_classes: int | None = None) -> torch.nn.Module:
        if stem not in _SIZE:
            raise ValueError(f"stem must be one of {sorted(_SIZE)}, got {stem!r}")
        built["stem"] = stem
        classes = num_classes if num_classes is not None else (1000 if stem == "imagenet" else 10)
        return constructor(num_classes=classes, width=width, stem=stem)

    def example_input() -> torch.Tensor:
        size = _SIZE[built["stem"]]
        return torch.randn(1, 3, size, size)

    return build_model, example_input
