"""The agreement measures, and the backend contract they exist for: an ONNX artifact is exported and compared
with the numpy reference in a process where torch cannot be imported at all."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qcompile.errors import QCompileError
from qcompile.ir.agreement import TensorAgreement, compare_backend
from qcompile.ir.graph import IRGraph
from qcompile.ir.types import DType, TensorInfo

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: the finder goes in before anything is imported, so any import of torch, however
# indirect, fails as it would where torch is not installed.
WITHOUT_TORCH = textwrap.dedent("""
    import sys

    class HideTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideTorch())
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("torch is not hidden")

    from pathlib import Path

    import numpy as np

    from qcompile.backends import onnx as qonnx
    from qcompile.ir import reference
    from qcompile.ir.graph import IRGraph
    from qcompile.ir.serialize import load, save
    from qcompile.ir.types import DType, TensorInfo

    tmp = Path(sys.argv[1])
    n = 16
    codes = np.arange(-127, 128, dtype=np.int32)
    ir = IRGraph(inputs=["x"], outputs=["y"])
    ir.add_value("x", TensorInfo(DType.FLOAT32, (2, n)))
    ir.add_op("quantize", ["x"], "q", TensorInfo(DType.INT8, (2, n), np.float32(0.05), None, -127, 127))
    ir.add_constant("table", np.clip(codes // 2 + 3, -127, 127), TensorInfo(DType.INT32, (len(codes),)))
    ir.add_op("lut", ["q", "table"], "t", TensorInfo(DType.INT8, (2, n), np.float32(0.1), None, -127, 127))
    ir.add_op("dequantize", ["t"], "y", TensorInfo(DType.FLOAT32, (2, n)))
    save(ir, tmp / "ir")
    ir = load(tmp / "ir")

    x = np.random.default_rng(0).uniform(-7.0, 7.0, (2, n)).astype(np.float32)
    pairs = [(x, reference.run(ir, x)["y"])]
    model = qonnx.to_onnx(ir)
    qonnx.save(model, tmp / "model.onnx")
    result = qonnx.compare_with_reference(ir, str(tmp / "model.onnx"), pairs)
    assert result == {"images": 2, "top1_agreement": 1.0, "identical_fraction": 1.0, "max_lsb_diff": 0}, result
    assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    print("ok")
""")


def test_onnx_export_and_comparison_run_without_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_tensor_agreement_accumulates_over_updates():
    agreement = TensorAgreement("t")
    agreement.update(np.array([1, 2, 3]), np.array([1, 2, 5]))
    agreement.update(np.array([[0, -4]]), np.array([[0, -3]]))
    assert (agreement.elements, agreement.identical, agreement.max_lsb_diff) == (5, 3, 2)
    assert agreement.identical_fraction == pytest.approx(0.6)
    assert TensorAgreement("empty").identical_fraction == 1.0


def test_compare_backend_needs_an_output_computed_from_integers():
    ir = IRGraph(inputs=["x"], outputs=["x"])
    ir.add_value("x", TensorInfo(DType.FLOAT32, (1, 4)))
    with pytest.raises(QCompileError, match="not computed from integers"):
        compare_backend(ir, lambda x: x, [])


def test_float_outputs_differ_in_units_in_the_last_place():
    """A softmax head's outputs are compared as float32 bit patterns: a difference counts ulps, across zero too."""
    from qcompile.ir.agreement import compare_logits

    ref = np.array([[0.25, 1e-8, 0.0, -1.5]], np.float32)
    out = ref.copy()
    out[0, 1] = np.nextafter(out[0, 1], np.float32(1), dtype=np.float32)
    out[0, 2] = np.nextafter(np.float32(0), np.float32(-1), dtype=np.float32)
    result = compare_logits(None, lambda x: out, [(np.zeros((1, 3)), ref)])
    assert result["identical_fraction"] == 0.5 and result["max_lsb_diff"] == 1 and result["top1_agreement"] == 1.0
