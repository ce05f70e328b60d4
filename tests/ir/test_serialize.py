import subprocess
import sys

import numpy as np
import pytest
import torch
from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger

from qcompile import Pipeline, get_recipe
from qcompile.ir import int4, reference
from qcompile.ir.serialize import IRFormatError, load, save
from qcompile.models import resnet20_cifar
from tests.conftest import randomize_bn


@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trip(signed):
    rng = np.random.default_rng(0)
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = rng.integers(lo, hi + 1, (3, 5, 7))
    packed = int4.pack(codes)
    assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
    assert np.array_equal(int4.unpack(packed, codes.shape, signed), codes)


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    model = randomize_bn(resnet20_cifar(), data=torch.randn(16, 3, 32, 32))
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16)) for _ in range(2)]
    res = Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]).run(
        model, torch.randn(1, 3, 32, 32), recipe=get_recipe("mostly4bit"), calibration_data=calib)
    return res.context.ir


def test_save_load_run_is_identical(lowered, tmp_path):
    path = save(lowered, tmp_path / "ir")
    loaded = load(path)
    assert [op.kind for op in loaded.ops] == [op.kind for op in lowered.ops]
    for name, data in lowered.constants.items():
        assert np.array_equal(loaded.constants[name], data), name
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a, b = reference.run(lowered, x), reference.run(loaded, x)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    npz = (path / "tensors.npz").stat().st_size
    assert npz < 4 * sum(d.size for d in lowered.constants.values())  # packed, not stored as int32


def test_load_needs_no_torch(lowered, tmp_path):
    path = save(lowered, tmp_path / "ir")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from qcompile.ir.serialize import load\n"
        "from qcompile.ir.reference import run\n"
        f"g = load({str(path)!r})\n"
        "print(run(g, np.zeros((1, 3, 32, 32), np.float32))[g.outputs[0]].shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 10)"


def test_version_and_format_checked(lowered, tmp_path):
    path = save(lowered, tmp_path / "ir")
    doc = (path / "graph.json").read_text().replace('"version": 1', '"version": 99')
    (path / "graph.json").write_text(doc)
    with pytest.raises(IRFormatError, match="version 99"):
        load(path)
    with pytest.raises(IRFormatError):
        load(tmp_path / "nowhere")
