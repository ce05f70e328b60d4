"""Seeded "as if trained" BatchNorm parameters for untrained example models.

A freshly built network has BatchNorms with weight 1, bias 0, running mean 0 and running variance 1: folding
them is a no-op and a quantization test on such a model misses every bug of the folding arithmetic. A trained
network's BatchNorms are nothing like that, so the example models give theirs seeded random values of the
size training produces.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_batchnorm(model: nn.Module, seed: int = 0, data: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial affine parameters and running statistics, in place.

    Drawn from a generator seeded with ``seed`` (the global RNG is left alone), per channel:
    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1²), running_mean ~ N(0, 0.1²), running_var ~ U(0.5, 2).

    With ``data`` (input batches), the running statistics are instead those the model measures on them, the
    BatchNorms in training mode and everything else in eval mode (a cumulative average over the batches), as
    after training: each BatchNorm then normalises what it really receives, so an untrained deep network's
    activations stay O(1) and its outputs depend on its input. The affine parameters stay random. Returns
    ``model``, every module back in the mode it was in.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
    if data is None:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()  # dropout and the like stay off (and off the global RNG) ...
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()  # ... while each BatchNorm normalises with, and accumulates, the batch statistics
    try:
        with torch.no_grad():
            for x in data:
                model(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return model


def randomize_norm_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded affine parameters for every LayerNorm and GroupNorm (the norms without running statistics, which
    nothing measures): weight ~ U(0.5, 1.5), bias ~ N(0, 0.1²), in place; PyTorch's ones and zeros would make
    them trivial. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.LayerNorm | nn.GroupNorm):
                continue
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model
