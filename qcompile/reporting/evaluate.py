"""Top-1 accuracy of a model over ``(inputs, labels)`` batches, with a progress bar on a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from qcompile.frontend.model_file import logits


@torch.no_grad()
def hits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], desc: str = "eval") -> torch.Tensor:
    """Per image, in order: whether the model's top-1 class is the label (for paired comparisons of models)."""
    was_training = model.training
    model.eval()
    out = [logits(model(x)).argmax(dim=1) == y
           for x, y in tqdm(batches, desc=desc, unit="batch", disable=None, leave=False)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(h: torch.Tensor) -> float:
    """Top-1 accuracy from per-image hits (NaN for no images)."""
    return int(h.sum()) / len(h) if len(h) else float("nan")


def top1(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], desc: str = "eval") -> tuple[float, int]:
    """(accuracy, number of images)."""
    h = hits(model, batches, desc)
    return accuracy(h), len(h)


def take_images(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], limit: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The first ``limit`` images of a batch stream (all when ``limit`` is None), cutting the last batch; a
    batch's labels may be None (calibration images alone)."""
    seen = 0
    for x, y in batches:
        if limit is not None and seen >= limit:
            return
        size = len(y) if y is not None else len(x)
        if limit is not None and seen + size > limit:
            x, y = x[: limit - seen], (y[: limit - seen] if y is not None else None)
            size = limit - seen
        seen += size
        yield x, y
