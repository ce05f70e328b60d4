"""Permutations that move the batch off the first axis go past the operations that do not care, until they
cancel: sequence-first code captures batch-first, computing the same."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from tests.frontend.test_attention import _moves_batch


class SequenceFirst(nn.Module):
    """Tokens ``(HW, N, C)`` as CLIP's attention pooling makes them, then what sequence-first code does with them:
    a mean token concatenated, a positional embedding added, a dense layer, a layer norm, a softmax over the
    sequence, a product with the tokens, slicing and squeezing, before going back to the batch first."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.pos = nn.Parameter(torch.randn(5, 1, 6))
        self.scale = nn.Parameter(torch.randn(6))
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        t = x.flatten(2).permute(2, 0, 1)
        t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + self.pos
        t = self.norm(F.gelu(self.fc(t)) * self.scale - 1.0)
        if self.tail == "squeeze":
            return t[:1].squeeze(0)
        if self.tail == "index":
            return t[0] + t.amax(dim=0)
        if self.tail == "softmax":
            w = t.softmax(dim=0)
            return (w * t).sum(0)
        if self.tail == "product":
            a = t.transpose(0, 1)
            return (a @ a.transpose(1, 2)).softmax(-1).permute(0, 2, 1).unsqueeze(1)
        return t[1:].permute(1, 2, 0).reshape(x.shape[0], 6, 2, 2)


@pytest.mark.parametrize("tail", ["squeeze", "index", "softmax", "product", "back"])
def test_sequence_first_code_captures_batch_first(tail):
    model = SequenceFirst(tail).eval()
    gm = capture(model, torch.randn(1, 6, 2, 2))
    assert not _moves_batch(gm)
    x = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_constant_of_lower_rank_broadcasts_and_training_captures_keep_computing_it():
    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x):
            t = x.permute(1, 0, 2)
            return (torch.relu(t - self.bias[None, None, :]) * 2.0).permute(1, 0, 2)

    for training in (False, True):
        model = Biased().train(training)
        gm = capture(model, torch.randn(1, 3, 4))
        assert not _moves_batch(gm)
        x = torch.randn(2, 3, 4)
        torch.testing.assert_close(gm(x), model(x))


def test_a_batch_reduction_keeps_its_permutation():
    class OverTheBatch(nn.Module):
        def forward(self, x):
            return (x * 1.0).permute(1, 0).mean(1)

    gm = capture(OverTheBatch(), torch.randn(2, 3))
    assert _moves_batch(gm)
