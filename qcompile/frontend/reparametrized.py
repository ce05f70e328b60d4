"""Weight reparametrizations baked into plain weights for an eval-mode capture.

Weight normalisation, spectral normalisation and pruning compute a layer's weight from other tensors on every
call: ``torch.nn.utils.weight_norm`` / ``spectral_norm`` as forward pre-hooks (``weight_g`` and ``weight_v``,
``weight_orig`` and ``weight_u``), their ``torch.nn.utils.parametrizations`` successors as parametrized
properties (``parametrizations.weight.original0``), ``torch.nn.utils.prune`` as a pre-hook multiplying
``weight_orig`` by ``weight_mask``. Frozen for inference, such a layer is a conv or linear with
the computed weight, which is what the passes fold and quantize; tracing through the hooks instead records no
weight at all. A checkpoint loads before this, in the model's own layout, as PyTorch's strict
``load_state_dict`` takes it. A training-mode capture (QAT) keeps the parametrizations: there the underlying
tensors train. The deprecated hooks it refuses, in one line: the weight they leave on the module after a training
step cannot be copied, and the parametrizations load the same checkpoints. So it does pruning, whose mask QAT
would not keep.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from qcompile.errors import CaptureError

_SUCCESSORS = {WeightNorm: "weight_norm", SpectralNorm: "spectral_norm"}


def _tensor_name(hook: object) -> str | None:
    """The attribute a weight-computing pre-hook sets, ``None`` for any other hook."""
    if isinstance(hook, prune.BasePruningMethod):
        return hook._tensor_name
    return hook.name if isinstance(hook, (WeightNorm, SpectralNorm)) else None


def check_trainable(model: nn.Module) -> None:
    """Refuse the deprecated weight and spectral norm hooks in a model to be trained, naming their successors, and
    pruning, whose mask training would not keep."""
    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                raise CaptureError(
                    f"{path or 'the model'} is pruned with torch.nn.utils.prune, whose mask quantization-aware "
                    f"training would not keep; call prune.remove(module, {hook._tensor_name!r}) on it first (its "
                    "zeros then train like any weight)")
            if (kind := _SUCCESSORS.get(type(hook))) is not None:
                raise CaptureError(
                    f"{path or 'the model'} uses torch.nn.utils.{kind} (deprecated hooks), which quantization-aware "
                    f"training cannot copy; use torch.nn.utils.parametrizations.{kind}, which loads the same "
                    "checkpoints")


def copy_for_inference(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (in eval mode) with every weight norm, spectral norm and pruning mask baked in.

    The hooks leave the weight they computed last on the module, which cannot be deep-copied after a forward pass
    with gradients (pytorch#103001); the copy takes it detached, and the removal recomputes it (from a checkpoint
    loaded since, too)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            name = _tensor_name(hook)
            w = getattr(m, name, None) if name is not None else None
            if isinstance(w, torch.Tensor) and not w.is_leaf:
                memo[id(w)] = w.detach().clone()
    copied = copy.deepcopy(model, memo)
    reparametrizations_removed(copied)
    return copied


def reparametrizations_removed(model: nn.Module) -> None:
    """Replace, in ``model`` (an eval-mode copy), every weight norm, spectral norm or pruning by the weight it
    computes now: what the hooks and parametrizations compute in eval mode (spectral norm without a power
    iteration, the pruned weight as ``weight_orig * weight_mask``)."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(m, hook.name)
            elif isinstance(hook, SpectralNorm):
                remove_spectral_norm(m, hook.name)
            elif isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
        if parametrize.is_parametrized(m):
            cls = type(m)  # the copy shares its parametrized class with the model: removal edits the class
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
