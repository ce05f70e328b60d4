"""The Triton fake-quantization kernels give exactly the eager definition's values and masks. Runs them in
Triton's CPU interpreter (in a subprocess, since ``TRITON_INTERPRET`` is read when the kernels are defined);
skipped where Triton is not installed (it comes with CUDA builds of PyTorch, not with the CPU wheel).

The interpreter truncates float32 to bfloat16 where the GPU rounds to nearest even, so a bfloat16 output is
checked here to within one bfloat16 step, and exactly in ``benchmarks/gpu_pareto.py``'s check on the GPU."""

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed")

SCRIPT = textwrap.dedent("""
    import torch
    from qcompile.quantization import fused_kernels
    from qcompile.quantization.quantizer import _Requantize, _RoundClip

    def eager(fn, *args):
        import os
        os.environ["QCOMPILE_FUSED_QUANT"] = "0"  # applies() then declines: the eager code runs
        try:
            return fn(*args)
        finally:
            os.environ["QCOMPILE_FUSED_QUANT"] = "cpu"

    def same(a, b):
        if a.dtype == torch.float32:
            return torch.equal(a, b)
        step = b.float().abs() * 2.0 ** -7  # one bfloat16 step: the interpreter truncates
        return bool(((a.float() - b.float()).abs() <= step).all())

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, channels_last in (((4, 6, 5, 7), False), ((4, 6, 5, 7), True), ((9, 11), False)):
            x = (torch.randn(shape, generator=g) * 3).to(dtype)
            x.view(-1)[:40] = torch.arange(-20, 20).to(dtype) * 0.25  # ties at s = 0.5
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            s = torch.tensor(0.5)
            for grad in (False, True):
                xi = x.clone().requires_grad_(grad)
                assert fused_kernels.applies(xi, s)
                fused = _RoundClip.apply(xi, s, -8, 7)
                ref = eager(_RoundClip.apply, x.clone().requires_grad_(grad), s, -8, 7)
                assert same(fused, ref) and fused.dtype == dtype, (dtype, shape)
                assert fused.stride() == x.stride()
                if grad:
                    fused.sum().backward()
                    xr = x.clone().requires_grad_(True)
                    eager(_RoundClip.apply, xr, s, -8, 7).sum().backward()
                    assert torch.equal(xi.grad, xr.grad)
            axis = x.dim() - 1 if x.dim() == 2 else 1
            s_acc = torch.rand(x.shape[axis], generator=g) * 0.01 + 1e-3
            s_out = torch.tensor(0.037)
            fused = _Requantize.apply(x, s_acc, s_out, axis, -128, 127)
            ref = eager(_Requantize.apply, x, s_acc, s_out, axis, -128, 127)
            assert same(fused, ref), (dtype, shape, channels_last)
    print("ok")
""")


def test_fused_kernels_match_the_eager_definition() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "QCOMPILE_FUSED_QUANT": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
