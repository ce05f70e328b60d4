"""Training data kept on the device: CIFAR is decoded once (:mod:`qcompile.data` caches it), normalised once,
and held as tensors where the model runs, so a training step never waits on a CPU data loader.

Augmentation (random crop of the zero-padded image + horizontal flip) runs on the device too. Its random
parameters are drawn for the whole global batch from one seeded generator on every rank, and each rank applies
the slice for its own shard, so N processes see exactly the images one process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qcompile.data import CIFAR_MEAN, CIFAR_STD, ImageSet, Stats, normalize
from qcompile.errors import DataError


def augment_params(gen: torch.Generator, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One global batch's random crop offsets (rows, columns, 0..8) and flips, drawn on the CPU."""
    dy = torch.randint(0, 9, (total,), generator=gen)
    dx = torch.randint(0, 9, (total,), generator=gen)
    flip = torch.rand(total, generator=gen) < 0.5
    return dy, dx, flip


def apply_augment(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each sample of the zero-padded (pad 4) batch at its offsets and flip it where asked (parameters
    on ``x``'s device, one per sample)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None, :])[:, None, :, None].expand(n, c, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + ar_w[None, :])[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def cutout_params(gen: torch.Generator, total: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch's cutout centres (rows, columns), drawn on the CPU."""
    return torch.randint(0, height, (total,), generator=gen), torch.randint(0, width, (total,), generator=gen)


def apply_cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero (the mean, after normalisation) a ``size`` x ``size`` square around each sample's centre, clipped at
    the border (DeVries & Taylor 2017)."""
    rows = torch.arange(x.shape[2], device=x.device)[None, :]
    cols = torch.arange(x.shape[3], device=x.device)[None, :]
    in_rows = (rows >= cy[:, None] - size // 2) & (rows < cy[:, None] - size // 2 + size)
    in_cols = (cols >= cx[:, None] - size // 2) & (cols < cx[:, None] - size // 2 + size)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


def augment(x: torch.Tensor, gen: torch.Generator, offset: int = 0, total: int | None = None) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded (pad 4) batch and a random horizontal flip, per sample.

    Parameters are drawn for ``total`` samples (default: this batch) and samples ``offset:offset+len(x)`` are
    used, so a shard of a global batch gets the crops the whole batch would have given it.
    """
    n = len(x)
    params = augment_params(gen, n if total is None else total)
    return apply_augment(x, *(p[offset:offset + n].to(x.device) for p in params))


@dataclass
class DeviceData:
    """A normalised split held as float32 NCHW images and int64 labels on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_imageset(cls, data: ImageSet, device: torch.device | str = "cpu",
                      stats: Stats = (CIFAR_MEAN, CIFAR_STD)) -> DeviceData:
        return cls(normalize(data.images, *stats).to(device), torch.from_numpy(data.labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full global batches per epoch (the ragged tail is dropped so every step has the same shape)."""
        return max(1, len(self) // batch_size)

    def train_batches(self, batch_size: int, epoch: int, seed: int, gen: torch.Generator, rank: int = 0,
                      world: int = 1, cutout: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of each shuffled, augmented global batch of ``batch_size`` images (with ``cutout``,
        a square of that side zeroed in each image, after the crop and flip)."""
        if batch_size % world:
            raise DataError(f"batch size {batch_size} does not split over {world} processes")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        if len(self) < batch_size:
            raise DataError.with_parameters(f"{len(self)} training images cannot fill one batch of {batch_size}; "
                                            "lower {batch_size}")
        local = batch_size // world
        steps = self.steps_per_epoch(batch_size)
        device = self.images.device
        # the epoch's randomness is drawn up front, in the order per-step draws would take it, and moved to the
        # device once: a step then waits on no host-to-device copy
        height, width = self.images.shape[2:]
        drawn = [augment_params(gen, batch_size) + (cutout_params(gen, batch_size, height, width) if cutout else ())
                 for _ in range(steps)]
        params = [torch.stack(p).to(device) for p in zip(*drawn)]
        order = order[:steps * batch_size].view(steps, batch_size).to(device)
        mine = slice(rank * local, (rank + 1) * local)
        for step in range(steps):
            shard = order[step, mine]
            dy, dx, flip, *hole = (p[step, mine] for p in params)
            x = apply_augment(self.images[shard], dy, dx, flip)
            yield (apply_cutout(x, *hole, cutout) if cutout else x), self.labels[shard]

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In order, unaugmented."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
