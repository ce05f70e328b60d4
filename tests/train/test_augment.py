"""Cutout: a square of the given side (clipped at the border) is zeroed in every training image, its centre
drawn from the run's seeded generator after each step's crop and flip (runs without cutout draw what they
always drew)."""

import torch

from qcompile.train.data import DeviceData, apply_cutout


def test_cutout_zeroes_a_clipped_square_per_image():
    x = torch.ones(3, 2, 8, 8)
    out = apply_cutout(x, torch.tensor([4, 0, 7]), torch.tensor([4, 0, 2]), 4)
    zeroed = (out == 0).all(dim=1)  # every channel
    assert zeroed[0].sum() == 16 and zeroed[0, 2:6, 2:6].all()
    assert zeroed[1].sum() == 4 and zeroed[1, :2, :2].all()  # clipped at the top-left corner
    assert zeroed[2].sum() == 12 and zeroed[2, 5:8, 0:4].all()  # clipped at the bottom
    assert torch.equal(out[out != 0], x[out != 0])


def test_cutout_comes_after_the_other_draws():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g) + 5  # no pixel is 0 but the crop's padding
    data = DeviceData(images, torch.zeros(16, dtype=torch.long))
    plain = list(data.train_batches(8, 0, 0, torch.Generator().manual_seed(1)))
    cut = list(data.train_batches(8, 0, 0, torch.Generator().manual_seed(1), cutout=8))
    (a, _), (b, _) = plain[0], cut[0]  # the first step's crops and flips are drawn first in both runs
    changed = (a != b).any(dim=1)  # so only the holes differ, and they are zero
    assert (b.permute(1, 0, 2, 3)[:, changed] == 0).all()
    per_image = changed.sum(dim=(1, 2))
    assert (per_image <= 64).all() and (per_image > 0).float().mean() > 0.5  # a hole may fall in the padding
