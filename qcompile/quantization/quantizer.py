"""Fake quantization: the one definition of the numerics every backend agrees on (DESIGN.md).

``q = clip(round_half_even(x / s), qmin, qmax)``, ``s = bound / qmax``, zero point 0. Gradients pass straight
through inside the representable range and are zero outside it. Activation quantizers observe (quantization
off) until frozen once; weight quantizers derive per-channel scales from the current max|w| at every call.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qcompile.errors import DataError
from qcompile.quantization import fused_kernels
from qcompile.quantization.spec import Calibrator, Granularity, QuantSpec

MAX_SAMPLES_PER_BATCH = 1 << 16
HISTOGRAM_BINS = 1 << 14  # 128 KiB of counts per percentile quantizer, resolving 1/8192 of max|x| or better
MSE_RESERVOIR = 1 << 18  # 1 MiB of samples per MSE quantizer: every sample of up to 4 full batches
DEFAULT_PERCENTILE = 99.99
EMA_DECAY = 0.9
_TINY = 1e-12
FUSED_LIMIT = 1 << 22  # the fused kernels' rounding is exact below this magnitude (codes of at most 23 bits)


class _RoundClip(torch.autograd.Function):
    """Quantize-dequantize with a straight-through estimator: identity gradient where not clipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        if scale.numel() == 1 and max(-qmin, qmax) < FUSED_LIMIT and fused_kernels.applies(x, scale):
            out, inside = fused_kernels.fake_quantize(x, scale, qmin, qmax, ctx.needs_input_grad[0])
            if inside is not None:
                ctx.save_for_backward(inside)
            return out
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
    ``acc = rhe(y / s_acc)`` recovered from the float output and ``M = float32(s_acc / s_out)``, ``s_acc`` one
    scale per channel along ``axis``; straight-through gradient inside the range."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, s_acc: torch.Tensor, s_out: torch.Tensor, axis: int, qmin: int,  # type: ignore[override]
                qmax: int) -> torch.Tensor:
        if max(-qmin, qmax) < FUSED_LIMIT and fused_kernels.applies(y, s_acc, s_out):
            out, inside = fused_kernels.requantize(y, s_acc, s_out, axis, qmin, qmax, ctx.needs_input_grad[0])
            if inside is not None:
                ctx.save_for_backward(inside)
            return out
        shape = [1] * y.dim()
        shape[axis] = -1
        s_acc = s_acc.reshape(shape)
        acc = y.to(torch.float64, copy=True).div_(s_acc.double()).round_().float()
        mult = (s_acc.double() / s_out.double()).float()
        q = acc.mul_(mult).round_()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp_(qmin, qmax).mul_(s_out.float()).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def capturing() -> bool:
    """True while a CUDA graph is being recorded on this thread's stream: nothing may wait for the device."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def safe_scale(bound: torch.Tensor, qmax: int, what: str) -> torch.Tensor:
    """``bound / qmax`` where a degenerate bound (zero, non-finite) gets a usable scale and a warning.

    A dead per-channel bound borrows the largest healthy channel's scale; with none, the scale is ``1 / qmax``.
    The replacement is computed on the device without reading anything back, so a training step stays free of
    host synchronisation and can be recorded as a CUDA graph; only the warning (skipped while recording) reads
    the count back.
    """
    bound = bound.detach().float()
    bad = ~torch.isfinite(bound) | (bound <= _TINY)
    healthiest = torch.where(bad, 0.0, bound).amax()
    bound = torch.where(bad, torch.where(healthiest > 0, healthiest, 1.0), bound)
    if not capturing() and bool(bad.any()):
        warnings.warn(f"{what}: {int(bad.sum())} degenerate range(s) (all-zero or non-finite); using a safe scale",
                      stacklevel=3)
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


@dataclass
class BatchPart:
    """Where the tensors observers see lie in their calibration batch: images ``[start, start + count)`` of
    ``images``. The calibrate pass runs a large batch in parts to bound memory and advances one shared part
    between forwards; the statistics are still those of the whole batch (see
    :meth:`ActivationQuantizer.begin_batch`)."""

    images: int
    start: int = 0
    count: int = 0


class StreamingHistogram:
    """Counts of non-negative values in ``bins`` equal bins over ``[0, R)``: bounded memory for a percentile of
    any number of values.

    ``R`` is a power of two above every value added; a larger value doubles it as often as needed, each doubling
    merging adjacent bin pairs, so the counts stay exact for the current bins and the bin width ``R / bins`` is
    at most ``2 max / bins``. :meth:`quantile` places each order statistic inside its bin, so it is within one bin
    width of ``torch.quantile`` (linear interpolation) over the same values.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.range = 0.0  # R; 0 while every value added was 0 (all in bin 0)
        self.total = 0

    @property
    def bin_width(self) -> float:
        """The resolution of :meth:`quantile`: ``R / bins``."""
        return self.range / self.bins

    def add(self, values: torch.Tensor) -> None:
        """Count ``values`` (non-negative and finite)."""
        v = values.detach().reshape(-1).to("cpu", torch.float64)
        if v.numel() == 0:
            return
        top = float(v.max())
        if not math.isfinite(top) or float(v.min()) < 0:
            raise ValueError("a histogram counts non-negative finite values")
        if top >= self.range and top > 0:
            self._widen(math.ldexp(1.0, math.frexp(top)[1]))  # the power of two just above top
        if self.range > 0:
            idx = v.mul_(self.bins / self.range).floor_().long().clamp_(max=self.bins - 1)  # exact: 2^k scaling
        else:
            idx = torch.zeros(v.numel(), dtype=torch.int64)
        self.counts += torch.bincount(idx, minlength=self.bins)
        self.total += v.numel()

    def _widen(self, new_range: float) -> None:
        if self.range > 0:
            factor = min(self.bins, round(new_range / self.range))
            merged = self.counts.view(self.bins // factor, factor).sum(dim=1)
            self.counts = torch.zeros_like(self.counts)
            self.counts[: merged.numel()] = merged
        self.range = new_range

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) as ``torch.quantile`` interpolates it, within :attr:`bin_width`; 0 when empty."""
        if self.total == 0:
            return 0.0
        rank = q * (self.total - 1)
        k = math.floor(rank)
        cum = torch.cumsum(self.counts, 0)
        low = self._order_statistic(k, cum)
        high = self._order_statistic(min(k + 1, self.total - 1), cum)
        return low + (rank - k) * (high - low)

    def _order_statistic(self, k: int, cum: torch.Tensor) -> float:
        """The ``k``-th smallest value (0-based), placed inside its bin by its rank among the bin's values."""
        i = int(torch.searchsorted(cum, torch.tensor(k), right=True))
        before = int(cum[i - 1]) if i else 0
        return (i + (k - before + 0.5) / int(self.counts[i])) * self.bin_width


class ActivationCalibrator:
    """How an activation quantizer chooses its bound: ``observe`` every batch (whole, or part by part), then
    ``end_batch``; after the last batch, ``bound()``.

    The max statistics every calibrator may read (``ema_max``, ``running_max``, ``batches``) stay buffers of the
    owning :class:`ActivationQuantizer`, which updates them: they are in its state dict whatever the calibrator.
    A calibrator keeps only its own state (a histogram, samples, a generator), bounded whatever the number of
    batches. To add one, write a subclass and give it an entry in :data:`CALIBRATORS`.
    """

    def __init__(self, owner: ActivationQuantizer) -> None:
        self.owner = owner  # a plain reference: the calibrator is not a submodule and owns no buffers

    def observe(self, x: torch.Tensor, part: BatchPart | None) -> None:
        """Collect what :meth:`bound` needs from ``x``: a whole batch (``part`` None) or the part ``part`` of one."""

    def end_batch(self) -> None:
        """The batch observed since the last call is complete."""

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
    """Draws ``MAX_SAMPLES_PER_BATCH`` values of every batch (a seeded draw with replacement; all of a smaller
    batch) and hands each batch's draw to :meth:`collect`.

    A batch seen in parts gets the draw it would have got whole, in the same order: the indices are drawn over
    the whole batch's flattened values at its first part and each part gathers those that fall in it
    (``torch.take``, without copying the part). That needs the part's images on dim 0 (a CNN activation); a
    tensor without them does not split with the batch (it comes from constants), so its draw is taken from its
    first part.
    """

    def __init__(self, owner: ActivationQuantizer) -> None:
        super().__init__(owner)
        self._gen = torch.Generator().manual_seed(owner.seed)
        self._index: torch.Tensor | None = None  # the batch's drawn flat indices, ascending; None: every value
        self._order: torch.Tensor | None = None  # where each of them goes in the draw
        self._drawn: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, part: BatchPart | None) -> None:
        if part is None or x.dim() == 0 or x.shape[0] != part.count:
            if part is None or part.start == 0:
                self._start(x.numel())
                self._gather(x, 0)
            return
        per_image = x.numel() // part.count
        if part.start == 0:
            self._start(per_image * part.images)
        self._gather(x, per_image * part.start)

    def _start(self, total: int) -> None:
        self._index = self._order = None
        if total > MAX_SAMPLES_PER_BATCH:
            self._index, self._order = torch.randint(total, (MAX_SAMPLES_PER_BATCH,), generator=self._gen).sort()
        self._drawn = torch.empty(min(total, MAX_SAMPLES_PER_BATCH))

    def _gather(self, x: torch.Tensor, offset: int) -> None:
        assert self._drawn is not None
        if self._index is None or self._order is None:
            self._drawn[offset : offset + x.numel()] = x.reshape(-1).float().cpu()
            return
        lo, hi = (int(torch.searchsorted(self._index, v)) for v in (offset, offset + x.numel()))
        local = (self._index[lo:hi] - offset).to(x.device)  # ascending: the part is read in memory order
        self._drawn[self._order[lo:hi]] = torch.take(x, local).float().cpu()

    def end_batch(self) -> None:
        if self._drawn is not None:
            self.collect(self._drawn)
        self._index = self._drawn = None

    def collect(self, drawn: torch.Tensor) -> None:
        """Keep what :meth:`bound` needs of one batch's draw."""
        raise NotImplementedError


class Percentile(_Sampling):
    """The owner's ``percentile`` of the drawn |x|, from a :class:`StreamingHistogram` of them: the draws of any
    number of batches in ``HISTOGRAM_BINS`` counts, within one bin (at most max|x| / 8192) of their exact
    percentile."""

    def __init__(self, owner: ActivationQuantizer) -> None:
        super().__init__(owner)
        self.histogram = StreamingHistogram()

    def collect(self, drawn: torch.Tensor) -> None:
        self.histogram.add(drawn.abs())

    def bound(self) -> float:
        return self.histogram.quantile(self.owner.percentile / 100.0)

    def reset(self) -> None:
        self.histogram = StreamingHistogram()


class Reservoir:
    """At most ``capacity`` of the values added, a uniform sample without replacement: every value gets a seeded
    uniform key and the ``capacity`` smallest keys stay. Until ``capacity`` is reached it holds every value in
    the order added."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self._gen = torch.Generator().manual_seed(seed)
        self._values: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._size = 0

    def add(self, values: torch.Tensor) -> None:
        self._values.append(values.reshape(-1))
        self._keys.append(torch.rand(values.numel(), generator=self._gen))
        self._size += values.numel()
        if self._size > self.capacity:
            keys, values = torch.cat(self._keys), torch.cat(self._values)
            keep = torch.topk(keys, self.capacity, largest=False).indices.sort().values
            self._keys, self._values, self._size = [keys[keep]], [values[keep]], self.capacity

    def values(self) -> torch.Tensor:
        """The values held, one tensor (a single 0 when nothing was added)."""
        return torch.cat(self._values) if self._values else torch.zeros(1)


class Mse(_Sampling):
    """The bound in (0, max|x|] minimising the quantization MSE of the drawn values, from a :class:`Reservoir`
    of ``MSE_RESERVOIR`` of them (every draw of up to four full batches)."""

    def __init__(self, owner: ActivationQuantizer) -> None:
        super().__init__(owner)
        self.reservoir = Reservoir(MSE_RESERVOIR, owner.seed + 1)

    def collect(self, drawn: torch.Tensor) -> None:
        self.reservoir.add(drawn)

    def bound(self) -> float:
        return mse_bound(self.reservoir.values(), self.owner.spec, float(self.owner.running_max))

    def reset(self) -> None:
        self.reservoir = Reservoir(MSE_RESERVOIR, self.owner.seed + 1)


CALIBRATORS: dict[Calibrator, type[ActivationCalibrator]] = {
    Calibrator.EMA_MAX: EmaMax,
    Calibrator.MAX: Max,
    Calibrator.PERCENTILE: Percentile,
    Calibrator.MSE: Mse,
}
"""The activation calibrators by :class:`Calibrator` value (``Calibrator.NONE`` has none: bf16)."""


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values as one dimension in memory order: a view of a dense tensor in any layout (channels-last
    included), on which full reductions run 15-50x faster than on the strided tensor itself."""
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    return x.permute(order).reshape(-1)


class NonFiniteActivation(DataError):
    """An activation quantizer observed NaN or inf, which has no range to quantize: raised with the quantizer, for
    the pass running the forward to name the value and the line that computed it."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__("an activation quantizer observed a value that is not finite (NaN or inf)")
        self.quantizer = quantizer


def _check_finite(batch_max: torch.Tensor, quantizer: nn.Module) -> None:
    if not capturing() and not torch.isfinite(batch_max):
        raise NonFiniteActivation(quantizer)


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
        self._part: BatchPart | None = None  # the batch being observed in parts, from begin_batch
        self._part_max: torch.Tensor | None = None
        self._accumulator: LayerAccumulator | ProductAccumulator | None = None
        cls = CALIBRATORS.get(spec.calibrator)
        self.calibrator: ActivationCalibrator | None = None if cls is None else cls(self)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, calibrator={self.spec.calibrator.value}, state={self.state.value}"

    def requantizes(self, accumulator: LayerAccumulator | ProductAccumulator) -> None:
        """Mark this quantizer as the requantize of an integer accumulator (a ReLU may sit between): it then
        rounds exactly as the integer kernel does. The accumulator's layer and quantizers are referred to, not
        owned."""
        object.__setattr__(self, "_accumulator", accumulator)

    def accumulator_scale(self) -> torch.Tensor | None:
        """The float32 scale of the accumulator this quantizer requantizes, if any: ``s_x · s_w[c]`` per channel
        of a layer's, ``s_a · s_b`` of a matrix product's."""
        return None if self._accumulator is None else self._accumulator.scale()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the max statistics, then what the calibrator needs, from one batch (or one part of the batch
        begun by :meth:`begin_batch`)."""
        x = x.detach()
        low, high = torch.aminmax(_memory_order(x))
        batch_max = torch.maximum(high, -low).abs().float()  # max|x| exactly, in one pass, no |x| copy
        if self._part is None:
            self._record(batch_max)
        else:
            _check_finite(batch_max, self)
            self._part_max = batch_max if self._part_max is None else torch.maximum(self._part_max, batch_max)
        if self.calibrator is not None:
            self.calibrator.observe(x, self._part)
            if self._part is None:
                self.calibrator.end_batch()

    def begin_batch(self, part: BatchPart) -> None:
        """Observe the next forwards as parts of one batch, ``part`` telling (as its owner advances it) which
        images each forward holds; :meth:`end_batch` then updates the statistics once, exactly as if the batch had
        been observed whole: the max of the parts' maxima, and the calibrator's draw of the whole batch."""
        self._part, self._part_max = part, None

    @torch.no_grad()
    def end_batch(self) -> None:
        """Close the batch :meth:`begin_batch` opened (a quantizer no part reached records nothing)."""
        batch_max, self._part, self._part_max = self._part_max, None, None
        if batch_max is None:
            return
        self._record(batch_max)
        if self.calibrator is not None:
            self.calibrator.end_batch()

    def _record(self, batch_max: torch.Tensor) -> None:
        if self.sync_across_ranks:
            torch.distributed.all_reduce(batch_max, op=torch.distributed.ReduceOp.MAX)
        _check_finite(batch_max, self)
        self.ema_max.copy_(batch_max if self.batches == 0 else EMA_DECAY * self.ema_max + (1 - EMA_DECAY) * batch_max)
        self.running_max.copy_(torch.maximum(self.running_max, batch_max))
        self.batches += 1

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

    @torch.no_grad()
    def saturate_at(self, bound: float, channels: int) -> bool:
        """Narrow the scale, if need be, until ``bound`` (a clamp's, ReLU6's 6.0) gives the range's end code in
        every one of ``channels``; whether it now does.

        Requantizing a clamped accumulator rounds twice (``rhe(bound / s_acc[c])`` then ``· M[c]``), so a bound
        that calibration made the range's end (max and EMA-max calibrators on ReLU6) lands on ``qmax`` in some
        channels and one below in others: clamps of one code per channel, which no integer kernel has. With
        ``s ≤ (|bound| − s_acc_max / 2) / (|end| − 1/2)`` every channel reaches the end: the range narrows by
        about half the coarsest accumulator step (MobileNetV2's last ReLU6: 0.3%)."""
        end = self.spec.qmax if bound > 0 else self.spec.qmin
        s_acc = self.accumulator_scale()
        limit = (abs(bound) - 0.5 * float(s_acc.max())) / (abs(end) - 0.5) if s_acc is not None and end else 0.0
        saved = self.scale.clone()
        for step in range(4):  # float32 rounding of M[c] may need the limit a hair lower
            if limit <= 0 or limit * (1 - 2e-6 * 4**step) >= float(saved):
                break
            self.scale.fill_(limit * (1 - 2e-6 * 4**step))
            if self.codes(torch.full((1, channels), bound)).unique().tolist() == [end]:
                return True
        self.scale.copy_(saved)
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is QuantizerState.OBSERVING:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        acc = self._accumulator
        if acc is not None and acc.ready():
            axis = acc.axis(x.dim())
            s_acc = acc.scale().reshape(-1).expand(x.shape[axis])  # one scale per channel along the axis
            return _Requantize.apply(x, s_acc, self.scale, axis, self.spec.qmin, self.spec.qmax)
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


@dataclass(frozen=True)
class LayerAccumulator:
    """The int32 accumulator of a quantized conv or dense layer: ``Σ q_x · q_w[c] + b_q[c]``."""

    layer: nn.Module
    input_quantizer: ActivationQuantizer
    weight_quantizer: WeightQuantizer

    def scale(self) -> torch.Tensor:
        return accumulator_scale(self.layer, self.input_quantizer, self.weight_quantizer)

    def ready(self) -> bool:
        """Whether the layer computes on codes yet (its input quantizer frozen, its weights quantized)."""
        return self.input_quantizer.state is QuantizerState.FROZEN and self.weight_quantizer.enabled

    def axis(self, ndim: int) -> int:
        return channel_axis(self.layer, ndim)


@dataclass(frozen=True)
class ProductAccumulator:
    """The int32 accumulator of a matrix product of two quantized tensors: ``Σ q_a · q_b``, one scale."""

    a: ActivationQuantizer
    b: ActivationQuantizer

    def scale(self) -> torch.Tensor:
        return self.a.scale.float() * self.b.scale.float()

    def ready(self) -> bool:
        """Whether both operands are codes yet."""
        return all(q.state is QuantizerState.FROZEN and q.enabled for q in (self.a, self.b))

    def axis(self, ndim: int) -> int:
        return ndim - 1  # any: the scale is the same along every axis


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


BIAS_CODE_LIMIT = 2**22
"""The largest bias code a layer's input scale is allowed to make. The fake-quant model holds a bias as
``float32(B · s)`` (a 24-bit significand), which is within a quarter of a code of the IR's int32 ``B`` only up to
about this size; it also leaves nearly all of int32 to the products the bias is added to."""


@torch.no_grad()
def fit_bias_scales(model: nn.Module) -> list[str]:
    """Raise each frozen input quantizer's scale where a reading layer's bias would need more than
    :data:`BIAS_CODE_LIMIT` codes at ``s_x · s_w[c]`` (an input whose calibrated range is tiny next to the bias
    added to it: a near-dead feature map, an untrained model's pooled features), so that the layer lowers. Such a
    layer's output is its bias to within the input's range, so the coarser input costs nothing visible. One line
    per raised scale."""
    floors: dict[ActivationQuantizer, tuple[float, list[str]]] = {}
    for name, layer in model.named_modules():
        bias = getattr(getattr(layer, "parametrizations", None), "bias", None)
        bq = next((p for p in bias if isinstance(p, BiasQuantizer)), None) if bias is not None else None
        if bq is None:
            continue
        _, aq, wq = bq._refs
        if aq.state is not QuantizerState.FROZEN:
            continue
        s_w = wq.scale_for(layer.parametrizations.weight.original).reshape(-1)
        need = float((bias.original.detach().abs() / (s_w * BIAS_CODE_LIMIT)).max())
        if need > float(aq.scale):
            floor, names = floors.get(aq, (0.0, []))
            floors[aq] = (max(floor, need), [*names, name])
    lines = []
    for aq, (floor, names) in floors.items():
        before = float(aq.scale)
        aq.scale.fill_(floor * (1 + 2**-20))  # float32 rounding must not bring a code back over the limit
        lines.append(f"the input scale of {', '.join(names)} was raised from {before:.3g} to {float(aq.scale):.3g} "
                     f"(its calibrated range ±{before * aq.spec.qmax:.3g} is tiny next to its bias) so the bias fits "
                     "int32")
    return lines
