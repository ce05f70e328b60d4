"""Fake quantization: the one definition of the numerics every backend agrees on (DESIGN.md).

``q = clip(round_half_even(x / s), qmin, qmax)``, ``s = bound / qmax``, zero point 0. Gradients pass straight
through inside the representable range and are zero outside it. Activation quantizers observe (quantization
off) until frozen once; weight quantizers derive per-channel scales from the current max|w| at every call.
"""

from __future__ import annotations

import enum
import warnings

import torch
from torch import nn

from qcompile.spec import Calibrator, Granularity, QuantSpec

MAX_SAMPLES_PER_BATCH = 1 << 16
DEFAULT_PERCENTILE = 99.99
EMA_DECAY = 0.9
_TINY = 1e-12


class _RoundClip(torch.autograd.Function):
    """Quantize-dequantize with a straight-through estimator: identity gradient where not clipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        q = torch.round(x / scale)
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp(qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize ``x`` with ``scale`` (broadcastable), straight-through in the backward pass."""
    return _RoundClip.apply(x, scale, qmin, qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as a float tensor of integers): what the integer IR stores."""
    return torch.round(x / scale).clamp(qmin, qmax)


def safe_scale(bound: torch.Tensor, qmax: int, what: str) -> torch.Tensor:
    """``bound / qmax`` where a degenerate bound (zero, non-finite) gets a usable scale and a warning.

    A dead per-channel bound borrows the largest healthy channel's scale; with none, the scale is ``1 / qmax``.
    """
    bound = bound.detach().float()
    bad = ~torch.isfinite(bound) | (bound <= _TINY)
    if bool(bad.any()):
        healthy = bound[~bad]
        fill = healthy.max() if healthy.numel() else torch.tensor(1.0)
        warnings.warn(f"{what}: {int(bad.sum())} degenerate range(s) (all-zero or non-finite); using a safe scale",
                      stacklevel=3)
        bound = torch.where(bad, fill, bound)
    return bound / qmax


def mse_bound(samples: torch.Tensor, spec: QuantSpec, max_abs: float, steps: int = 100) -> float:
    """The clipping bound in (0, max|x|] that minimises the quantization MSE of ``samples``."""
    if max_abs <= _TINY:
        return max_abs
    candidates = torch.linspace(max_abs / steps, max_abs, steps)
    errors = torch.stack([
        ((fake_quantize(samples, c / spec.qmax, spec.qmin, spec.qmax) - samples) ** 2).mean() for c in candidates
    ])
    return float(candidates[int(errors.argmin())])


class QuantizerState(enum.Enum):
    OBSERVING = "observing"  # statistics collected, values pass through unquantized
    FROZEN = "frozen"  # bound fixed; values are fake-quantized


class ActivationQuantizer(nn.Module):
    """A per-tensor activation quantizer: observes during calibration, then frozen once and applied."""

    def __init__(self, spec: QuantSpec, percentile: float = DEFAULT_PERCENTILE, seed: int = 0) -> None:
        super().__init__()
        if spec.granularity is not Granularity.PER_TENSOR:
            raise ValueError("activation quantizers are per tensor")
        self.spec = spec
        self.percentile = percentile
        self.state = QuantizerState.OBSERVING
        self.enabled = True
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("ema_max", torch.tensor(0.0))
        self.register_buffer("running_max", torch.tensor(0.0))
        self.batches = 0
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, calibrator={self.spec.calibrator.value}, state={self.state.value}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the statistics the calibrator needs from one batch."""
        batch_max = x.detach().abs().max().float()
        if not torch.isfinite(batch_max):
            raise ValueError("activation quantizer observed a non-finite value")
        self.ema_max.copy_(batch_max if self.batches == 0 else EMA_DECAY * self.ema_max + (1 - EMA_DECAY) * batch_max)
        self.running_max.copy_(torch.maximum(self.running_max, batch_max))
        self.batches += 1
        if self.spec.calibrator in (Calibrator.PERCENTILE, Calibrator.MSE):
            flat = x.detach().reshape(-1).float().cpu()
            if flat.numel() > MAX_SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (MAX_SAMPLES_PER_BATCH,), generator=self._gen)]
            self._samples.append(flat)

    def bound(self) -> float:
        """The bound the calibrator chooses from what was observed."""
        cal = self.spec.calibrator
        if cal is Calibrator.EMA_MAX:
            return float(self.ema_max)
        if cal is Calibrator.MAX:
            return float(self.running_max)
        samples = torch.cat(self._samples) if self._samples else torch.zeros(1)
        if cal is Calibrator.PERCENTILE:
            return float(torch.quantile(samples.abs(), self.percentile / 100.0))
        if cal is Calibrator.MSE:
            return mse_bound(samples, self.spec, float(self.running_max))
        raise ValueError(f"calibrator {cal.value} cannot set an activation bound")

    @torch.no_grad()
    def freeze(self, name: str = "activation") -> None:
        """Fix the scale from the observed statistics; from now on values are quantized."""
        if self.batches == 0:
            raise RuntimeError(f"{name}: frozen without observing any batch")
        self.scale.copy_(safe_scale(torch.tensor(self.bound()), self.spec.qmax, name))
        self.state = QuantizerState.FROZEN
        self._samples = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is QuantizerState.OBSERVING:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        return fake_quantize(x, self.scale, self.spec.qmin, self.spec.qmax)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantization from the current max|w| (a parametrization)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if spec.granularity is not Granularity.PER_CHANNEL:
            raise ValueError("weight quantizers are per output channel")
        self.spec = spec
        self.enabled = True

    def extra_repr(self) -> str:
        return f"{self.spec.describe()} per-channel"

    def scale_for(self, w: torch.Tensor) -> torch.Tensor:
        """One scale per output channel (dim 0), shaped to broadcast against ``w``."""
        bound = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
        return safe_scale(bound, self.spec.qmax, "weight").reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quantize(w, self.scale_for(w), self.spec.qmin, self.spec.qmax)
