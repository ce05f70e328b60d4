"""CIFAR-10 ResNet-20 (He et al., 3 stages of 16/32/64 filters, projection shortcuts) as a qcompile model file.

With no flags it loads the project's trained checkpoint (``weights/resnet20_cifar.pt``) and calibrates and
evaluates on the CIFAR-10 sample shipped beside it (``data/cifar10-sample.tar.gz``: 512 training images for
calibration, 2,000 test images), so this works on a fresh clone:

    qcompile examples/resnet20_cifar.py --recipe mostly4bit

``--weights`` replaces the checkpoint and ``--data`` the sample (e.g. the full CIFAR-10 archive).
"""

from pathlib import Path

import torch

from qcompile.data import Batches, load_split
from qcompile.frontend.model_file import load_weights
from qcompile.models import resnet20_cifar

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights" / "resnet20_cifar.pt"
SAMPLE = HERE / "data" / "cifar10-sample.tar.gz"


def build_model(width: float = 1.0, num_classes: int = 10, pretrained: bool = True) -> torch.nn.Module:
    model = resnet20_cifar(num_classes=num_classes, width=width)
    if pretrained and width == 1.0 and num_classes == 10 and WEIGHTS.exists():
        load_weights(model, WEIGHTS)
    return model


def example_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)


def calibration_data() -> Batches:
    return Batches(load_split(SAMPLE, "train"), batch_size=128)


def eval_data() -> Batches:
    return Batches(load_split(SAMPLE, "test"), batch_size=500)
