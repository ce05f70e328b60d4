"""A training step recorded once as a CUDA graph and replayed: forward under bf16 autocast, cross-entropy,
backward and the SGD update run as one launch, so a small CIFAR model keeps the GPU busy instead of waiting on
hundreds of kernel launches per step.

What makes a step recordable: nothing in it reads a value back to the host (the quantizers' checks are skipped
while recording, :func:`qcompile.quantization.quantizer.capturing`), every tensor it touches keeps its address
(inputs are copied into static buffers, the learning rate is a device tensor), and its Python branches are fixed
while it replays. The branches change twice: when the activation quantizers freeze, and on the first step
(an EMA starts from its first batch). So the step is recorded after a few eager warm-up steps, and recorded
again after :meth:`CapturedStep.reset` when the trainer freezes the quantizers. Warm-up steps are real steps:
the same update, run eagerly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.frontend.model_file import logits
from qcompile.quantization.quantizer import ActivationQuantizer, QuantizerState

WARMUP_STEPS = 3  # eager steps before recording: cuDNN's algorithm search and lazy initialisations happen there


@torch.no_grad()
def sgd_step(opt: torch.optim.SGD, lr: torch.Tensor) -> None:
    """``opt``'s update (momentum, nesterov, per-group weight decay, no dampening) with the learning rate read
    from the device tensor ``lr``: the same arithmetic as ``torch.optim.SGD``, and its state, with no host value
    baked into a recorded graph. Momentum buffers must exist (:func:`init_momentum`)."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            bufs = [opt.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            if group["nesterov"]:
                torch._foreach_add_(grads, bufs, alpha=group["momentum"])
            else:
                grads = bufs
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


def init_momentum(opt: torch.optim.SGD) -> None:
    """Give every parameter a momentum buffer (zeros: the first update then stores the gradient, as SGD's does)."""
    for group in opt.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                state = opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class CapturedStep:
    """``step(x, y)`` trains ``model`` on one batch and returns the loss (a device tensor): eagerly for the first
    :data:`WARMUP_STEPS` calls after construction or :meth:`reset`, then by replaying the recorded graph."""

    def __init__(self, model: nn.Module, opt: torch.optim.SGD, device: torch.device,
                 label_smoothing: float = 0.0) -> None:
        self.model, self.opt, self.device = model, opt, device
        self.label_smoothing = label_smoothing
        self.lr = torch.zeros((), device=device)
        self.observers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        self.eager_left = WARMUP_STEPS
        self.side = torch.cuda.Stream(device)
        init_momentum(opt)

    def reset(self) -> None:
        """Forget the recorded graph (the model's branches changed): warm up and record again."""
        self.graph, self.static, self.eager_left = None, None, WARMUP_STEPS

    def _forward_backward_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(logits(self.model(x)), y, label_smoothing=self.label_smoothing)
        loss.backward()
        sgd_step(self.opt, self.lr)
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lrs = {g["lr"] for g in self.opt.param_groups}
        if len(lrs) != 1:
            raise ValueError("a captured step takes one learning rate for every parameter group")
        self.lr.fill_(lrs.pop())
        if self.graph is None and self.eager_left > 0:
            self.eager_left -= 1
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._forward_backward_update(x, y)
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return loss
        if self.graph is None:
            self._record(x, y)
        assert self.graph is not None and self.static is not None
        sx, sy, loss = self.static
        sx.copy_(x)
        sy.copy_(y)
        self.graph.replay()
        for q in self.observers:  # the Python-side count the eager observe keeps (the EMA itself is in the graph)
            if q.state is QuantizerState.OBSERVING:
                q.batches += 1
        return loss

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        sx, sy = x.clone(), y.clone()
        self.opt.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._forward_backward_update(sx, sy)
        self.graph, self.static = graph, (sx, sy, loss)
