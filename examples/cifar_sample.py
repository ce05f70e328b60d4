"""The CIFAR-10 sample shipped in ``data/`` as the example model files' data hooks, and the images their
untrained models measure BatchNorm statistics on (not a model file itself: they import it)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from qcompile.data import Batches, iterate_batches, load_split

SAMPLE = Path(__file__).resolve().parent / "data" / "cifar10-sample.tar.gz"


def statistics_images(seed: int = 0, n: int = 32) -> Tensor:
    """``n`` training images of the sample (a seeded draw), normalised as the data hooks'.

    An untrained model's BatchNorm running statistics are measured on them: with random statistics instead, the
    logits barely depend on the input; measured on noise images, they do not fit real ones (EfficientNet-B0's
    last BatchNorms then put out 20x the spread they should).
    """
    return next(iterate_batches(load_split(SAMPLE, "train").subset(n, seed=seed), n))[0]


def example_input() -> Tensor:
    return torch.randn(1, 3, 32, 32)


def calibration_data() -> Batches:
    return Batches(load_split(SAMPLE, "train"), batch_size=128)


def eval_data() -> Batches:
    return Batches(load_split(SAMPLE, "test"), batch_size=500)
