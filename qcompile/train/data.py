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

from qcompile.data import ImageSet, normalize
from qcompile.errors import DataError


def augment(x: torch.Tensor, gen: torch.Generator, offset: int = 0, total: int | None = None) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded (pad 4) batch and a random horizontal flip, per sample.

    Parameters are drawn for ``total`` samples (default: this batch) and samples ``offset:offset+len(x)`` are
    used, so a shard of a global batch gets the crops the whole batch would have given it.
    """
    n, c, h, w = x.shape
    total = n if total is None else total
    dy = torch.randint(0, 9, (total,), generator=gen)[offset:offset + n].to(x.device)
    dx = torch.randint(0, 9, (total,), generator=gen)[offset:offset + n].to(x.device)
    flip = (torch.rand(total, generator=gen) < 0.5)[offset:offset + n].to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None, :])[:, None, :, None].expand(n, c, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + ar_w[None, :])[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@dataclass
class DeviceData:
    """A normalised split held as float32 NCHW images and int64 labels on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_imageset(cls, data: ImageSet, device: torch.device | str = "cpu") -> DeviceData:
        return cls(normalize(data.images).to(device), torch.from_numpy(data.labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full global batches per epoch (the ragged tail is dropped so every step has the same shape)."""
        return max(1, len(self) // batch_size)

    def train_batches(self, batch_size: int, epoch: int, seed: int, gen: torch.Generator,
                      rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of each shuffled, augmented global batch of ``batch_size`` images."""
        if batch_size % world:
            raise DataError(f"batch size {batch_size} does not split over {world} processes")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        if len(self) < batch_size:
            raise DataError.with_parameters(f"{len(self)} training images cannot fill one batch of {batch_size}; "
                                            "lower {batch_size}")
        local = batch_size // world
        for step in range(self.steps_per_epoch(batch_size)):
            idx = order[step * batch_size:(step + 1) * batch_size]
            shard = idx[rank * local:(rank + 1) * local].to(self.images.device)
            yield augment(self.images[shard], gen, offset=rank * local, total=batch_size), self.labels[shard]

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In order, unaugmented."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
