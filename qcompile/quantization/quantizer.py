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

from qcompile.quantization.spec import Calibrator, Granularity, QuantSpec

MAX_SAMPLES_PER_BATCH = 1 << 16
DEFAULT_PERCENTILE = 99.99
EMA_DECAY = 0.9
_TINY = 1e-12


class _RoundClip(torch.autograd.Function):
    """Quantize-dequantize with a straight-through estimator: identity gradient where not clipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        s = scale.float()
        q = (x.float() / s).round_()  # float32 whatever the model's dtype: the IR's arithmetic
        if ctx.needs_input_grad[0]:  # evaluation and calibration skip the mask (and its two passes)
            ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp_(qmin, qmax).mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize ``x`` with ``scale`` (broadcastable), straight-through in the backward pass."""
    return _RoundClip.apply(x, scale, qmin, qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as a float tensor of integers): what the integer IR stores."""
    return torch.round(x.float() / scale.float()).clamp(qmin, qmax)


class _Requantize(torch.autograd.Function):
    """The integer requantize of a conv/dense accumulator, ``clip(rhe(float32(acc) · M), qmin, qmax)``, with
    ``acc = rhe(y / s_acc)`` recovered from the float output and ``M = float32(s_acc / s_out)``; straight-through
    gradient inside the range."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, s_acc: torch.Tensor, s_out: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        acc = y.to(torch.float64, copy=True).div_(s_acc.double()).round_().float()
        mult = (s_acc.double() / s_out.double()).float()
        q = acc.mul_(mult).round_()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp_(qmin, qmax).mul_(s_out.float()).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


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


class ActivationCalibrator:
    """How an activation quantizer chooses its bound: ``observe(x)`` once per calibration batch, then ``bound()``.

    The max statistics every calibrator may read (``ema_max``, ``running_max``, ``batches``) stay buffers of the
    owning :class:`ActivationQuantizer`, which updates them before calling :meth:`observe`: they are in its state
    dict whatever the calibrator. A calibrator keeps only its own state (samples, a generator). To add one, write a
    subclass and give it an entry in :data:`CALIBRATORS`.
    """

    def __init__(self, owner: ActivationQuantizer) -> None:
        self.owner = owner  # a plain reference: the calibrator is not a submodule and owns no buffers

    def observe(self, x: torch.Tensor) -> None:
        """Collect what :meth:`bound` needs from one batch beyond the owner's max statistics."""

    def bound(self) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop what was collected for :meth:`bound` (after freezing)."""


class EmaMax(ActivationCalibrator):
    """The EMA of the per-batch max|x|: the paper's activation bound."""

    def bound(self) -> float:
        return float(self.owner.ema_max)


class Max(ActivationCalibrator):
    """The largest max|x| of any batch."""

    def bound(self) -> float:
        return float(self.owner.running_max)


class _Sampling(ActivationCalibrator):
    """Keeps up to ``MAX_SAMPLES_PER_BATCH`` values of every batch (a seeded random subset of larger batches)."""

    def __init__(self, owner: ActivationQuantizer) -> None:
        super().__init__(owner)
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(owner.seed)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() > MAX_SAMPLES_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (MAX_SAMPLES_PER_BATCH,), generator=self._gen)]
        self._samples.append(flat)

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(1)

    def reset(self) -> None:
        self._samples = []


class Percentile(_Sampling):
    """The owner's ``percentile`` of the sampled |x|."""

    def bound(self) -> float:
        return float(torch.quantile(self.samples().abs(), self.owner.percentile / 100.0))


class Mse(_Sampling):
    """The bound in (0, max|x|] minimising the quantization MSE of the samples."""

    def bound(self) -> float:
        return mse_bound(self.samples(), self.owner.spec, float(self.owner.running_max))


CALIBRATORS: dict[Calibrator, type[ActivationCalibrator]] = {
    Calibrator.EMA_MAX: EmaMax,
    Calibrator.MAX: Max,
    Calibrator.PERCENTILE: Percentile,
    Calibrator.MSE: Mse,
}
"""The activation calibrators by :class:`Calibrator` value (``Calibrator.NONE`` has none: bf16)."""


class QuantizerState(enum.Enum):
    OBSERVING = "observing"  # statistics collected, values pass through unquantized
    FROZEN = "frozen"  # bound fixed; values are fake-quantized


class ActivationQuantizer(nn.Module):
    """A per-tensor activation quantizer: observes during calibration, then frozen once and applied.

    It tracks the max statistics (``ema_max``, ``running_max``, ``batches``) and delegates the choice of bound to
    its :class:`ActivationCalibrator` (``self.calibrator``, from :data:`CALIBRATORS` by ``spec.calibrator``).
    """

    def __init__(self, spec: QuantSpec, percentile: float = DEFAULT_PERCENTILE, seed: int = 0) -> None:
        super().__init__()
        if spec.granularity is not Granularity.PER_TENSOR:
            raise ValueError("activation quantizers are per tensor")
        self.spec = spec
        self.percentile = percentile
        self.seed = seed
        self.state = QuantizerState.OBSERVING
        self.enabled = True
        self.sync_across_ranks = False  # data-parallel training: observe the max over every process's shard
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("ema_max", torch.tensor(0.0))
        self.register_buffer("running_max", torch.tensor(0.0))
        self.batches = 0
        self._accumulator: tuple[nn.Module, ActivationQuantizer, WeightQuantizer] | None = None
        cls = CALIBRATORS.get(spec.calibrator)
        self.calibrator: ActivationCalibrator | None = None if cls is None else cls(self)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, calibrator={self.spec.calibrator.value}, state={self.state.value}"

    def requantizes(self, layer: nn.Module, input_quantizer: ActivationQuantizer, weight_quantizer: WeightQuantizer) -> None:
        """Mark this quantizer as the requantize of ``layer``'s integer accumulator (a ReLU may sit between):
        it then rounds exactly as the integer kernel does. The layer is referred to, not owned."""
        object.__setattr__(self, "_accumulator", (layer, input_quantizer, weight_quantizer))

    def accumulator_scale(self) -> torch.Tensor | None:
        """``s_x · s_w[c]`` (float32, per channel) of the accumulator this quantizer requantizes, if any."""
        return None if self._accumulator is None else accumulator_scale(*self._accumulator)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the max statistics, then what the calibrator needs, from one batch."""
        batch_max = x.detach().abs().max().float()
        if self.sync_across_ranks:
            torch.distributed.all_reduce(batch_max, op=torch.distributed.ReduceOp.MAX)
        if not torch.isfinite(batch_max):
            raise ValueError("activation quantizer observed a non-finite value")
        self.ema_max.copy_(batch_max if self.batches == 0 else EMA_DECAY * self.ema_max + (1 - EMA_DECAY) * batch_max)
        self.running_max.copy_(torch.maximum(self.running_max, batch_max))
        self.batches += 1
        if self.calibrator is not None:
            self.calibrator.observe(x)

    def bound(self) -> float:
        """The bound the calibrator chooses from what was observed."""
        if self.calibrator is None:
            raise ValueError(f"calibrator {self.spec.calibrator.value} cannot set an activation bound")
        return self.calibrator.bound()

    @torch.no_grad()
    def freeze(self, name: str = "activation") -> None:
        """Fix the scale from the observed statistics; from now on values are quantized."""
        if self.batches == 0:
            raise RuntimeError(f"{name}: frozen without observing any batch")
        self.scale.copy_(safe_scale(torch.tensor(self.bound()), self.spec.qmax, name))
        self.state = QuantizerState.FROZEN
        if self.calibrator is not None:
            self.calibrator.reset()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes this frozen quantizer gives ``x`` (what the integer IR holds), by its own forward."""
        return torch.round(self(x).float() / self.scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is QuantizerState.OBSERVING:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        s_acc = self.accumulator_scale()
        if s_acc is not None and self._accumulator[1].state is QuantizerState.FROZEN and self._accumulator[2].enabled:  # type: ignore[index]
            shape = [1] * x.dim()
            shape[channel_axis(self._accumulator[0], x.dim())] = -1  # type: ignore[index]
            return _Requantize.apply(x, s_acc.reshape(shape), self.scale, self.spec.qmin, self.spec.qmax)
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
        """One float32 scale per output channel (dim 0), shaped to broadcast against ``w``."""
        bound = w.detach().float().abs().reshape(w.shape[0], -1).amax(dim=1)
        return safe_scale(bound, self.spec.qmax, "weight").reshape(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quantize(w, self.scale_for(w), self.spec.qmin, self.spec.qmax)


INT32_QMAX = 2**31 - 1


def channel_axis(layer: nn.Module, ndim: int) -> int:
    """The output-channel axis of a layer's ``ndim``-d result: the last for ``nn.Linear``, which contracts its
    input's last axis whatever the rank (a channels-last tensor in ConvNeXt), else 1 (a convolution)."""
    return ndim - 1 if isinstance(layer, nn.Linear) else 1


def accumulator_scale(layer: nn.Module, input_quantizer: ActivationQuantizer,
                      weight_quantizer: WeightQuantizer) -> torch.Tensor:
    """``s_x · s_w[c]`` in float32: the scale of a quantized layer's int32 accumulator and of its bias."""
    w = layer.parametrizations.weight.original
    return input_quantizer.scale.float() * weight_quantizer.scale_for(w).reshape(-1)


class BiasQuantizer(nn.Module):
    """Rounds a layer's bias to int32 at scale ``s_x · s_w[c]``, as the integer kernel adds it (a parametrization).

    It refers to its layer and the layer's input quantizer without owning them (they live elsewhere in the
    graph module), and passes the bias through until the input quantizer is frozen.
    """

    def __init__(self, layer: nn.Module, input_quantizer: ActivationQuantizer, weight_quantizer: WeightQuantizer) -> None:
        super().__init__()
        object.__setattr__(self, "_refs", (layer, input_quantizer, weight_quantizer))

    def scale(self) -> torch.Tensor:
        """Per-output-channel bias scale ``s_x · s_w[c]``."""
        return accumulator_scale(*self._refs).detach()

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        _, aq, wq = self._refs
        if aq.state is not QuantizerState.FROZEN or not aq.enabled or not wq.enabled:
            return b
        return fake_quantize(b, self.scale(), -INT32_QMAX, INT32_QMAX)
