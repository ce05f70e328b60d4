"""Small models shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu → conv-bn + residual → relu → pool → dense: the shape of a ResNet in five layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.body_bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        x = self.relu(self.body_bn(self.body(x)) + x)
        return self.head(torch.flatten(self.pool(x), 1))


def randomize_bn(model: nn.Module, seed: int = 0, data: torch.Tensor | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and statistics, so folding is really tested.

    With ``data``, the statistics are those the model measures on it (as after training, keeping deep
    networks' activations O(1)); without, they are random.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    if data is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for chunk in data.split(8):
                model(chunk)
    return model.eval()


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyNet()).eval()


def train_steps(gm: torch.nn.Module, steps: int = 6, classes: int = 5, size: int = 8) -> torch.nn.Module:
    """A few SGD steps of a QAT graph on random images, its activation quantizers observing the first half and
    frozen for the rest; returned in eval mode."""
    from qcompile.train.qat import ActivationSchedule

    gm.train()
    sched = ActivationSchedule(gm, total_steps=steps, fraction=0.5)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        sched.before_step(step)
        x, y = torch.randn(16, 3, size, size, generator=g), torch.randint(0, classes, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gm.eval()
