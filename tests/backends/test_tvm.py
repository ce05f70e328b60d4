"""The TVM backend: CPU artifacts bit-exact with the reference, runnable with the runtime library alone;
CUDA artifacts built here with int8 layers on tensor cores."""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from qcompile.backends.tvm import runtime, targets  # noqa: E402
from qcompile.backends.tvm import build as tvm_build  # noqa: E402
from qcompile.backends.tvm.build import build  # noqa: E402
from qcompile.backends.tvm.cuda import kernel_bodies  # noqa: E402
from qcompile.backends.tvm.targets import get_target, host_cpu_target  # noqa: E402

from qcompile.ir import (
    int4,  # noqa: E402
    reference,  # noqa: E402
    serialize,  # noqa: E402
)
from qcompile.ir.agreement import compare_backend  # noqa: E402
from qcompile.ir.types import DType  # noqa: E402
from tests.conftest import TinyNet  # noqa: E402
from tests.ir.test_reference import arithmetic_activations, pooling_case  # noqa: E402
from tests.passes.test_lower_integer import ArithmeticNet, FunctionalNet, ModuleNet, _lowered  # noqa: E402

# the VNNI target where this CPU has it; plain AVX2 code elsewhere (same Relax module, same numerics)
CPU = host_cpu_target()
ROOT = Path(__file__).resolve().parents[2]


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _agreement(ir, model, x):
    pairs = [(x, reference.run(ir, x)[ir.outputs[0]])]
    return compare_backend(ir, lambda b: model(b)[0], pairs)


@pytest.mark.parametrize(("net", "recipe"),
                         [(FunctionalNet, "mostly4bit"), (ModuleNet, "int8"), (ArithmeticNet, "int4")])
def test_cpu_artifact_is_bit_exact_with_the_reference(net, recipe, tmp_path):
    ir = _lowered(net(), recipe).context.ir
    art = build(ir, CPU, tmp_path)
    assert art.path == tmp_path / "tvm" / CPU
    result = _agreement(ir, runtime.load(art.path), _images(24))
    assert result == {"images": 24, "top1_agreement": 1.0, "identical_fraction": 1.0, "max_lsb_diff": 0}


@pytest.mark.parametrize(("in_dtype", "out_dtype", "keepdim", "spatial"), [
    (DType.INT8, DType.UINT8, False, (7, 7)), (DType.UINT4, DType.INT8, True, (7, 7)),
    (DType.UINT8, DType.UINT8, True, (49,))])
def test_global_avgpool_is_bit_exact(in_dtype, out_dtype, keepdim, spatial, tmp_path):
    """The integer pooling's one kernel (int32 sum, float32 multiply, round half to even) on a ResNet-50 7x7,
    and over L of an (N, C, L) view."""
    ir, x = pooling_case(in_dtype, out_dtype, spatial, 0.037, 0.43, keepdim, n=16, c=64)
    got = runtime.load(build(ir, CPU, tmp_path).path)(x)[0]
    np.testing.assert_array_equal(got, reference.run(ir, x)["y"])


class FloatFunctions(nn.Module):
    """Every float activation of the IR in one float model (SE gate, GELU, hand-written hardswish, clamps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = x * torch.sigmoid(torch.nn.functional.adaptive_avg_pool2d(x, 1))
        x = torch.nn.functional.gelu(self.conv2(x), approximate="tanh")
        x = torch.nn.functional.gelu(x * torch.nn.functional.relu6(x + 3) / 6)
        x = torch.nn.functional.leaky_relu(torch.nn.functional.hardswish(x), 0.2)
        x = torch.nn.functional.hardsigmoid(torch.tanh(x).clamp(min=-0.5))
        return self.fc(x.mean((2, 3)))


def test_float_activations_agree_with_the_reference_to_float32_rounding(tmp_path):
    """A float model (what ``--measure`` times beside a TVM artifact) runs the IR's float ``activation`` ops in
    Relax's float32 ops: not bit for bit (the reference rounds float64 once), within float32 rounding."""
    from qcompile.cli.measure import lowered

    from qcompile.quantization.recipes import get_recipe

    torch.manual_seed(0)
    ir = lowered(FloatFunctions().eval(), (torch.randn(1, 3, 16, 16),), get_recipe("bf16"), 1.0, [])[1]
    assert {op.attrs["function"] for op in ir.ops if op.kind == "activation"} == {
        "silu", "sigmoid", "gelu", "gelu_tanh", "clip", "leaky_relu", "hardswish", "hardsigmoid", "tanh"}
    x = _images(8)
    model = runtime.load(build(ir, CPU, tmp_path, float_dtype="float32").path)
    np.testing.assert_allclose(model(x)[0], reference.run(ir, x)[ir.outputs[0]], rtol=1e-5, atol=1e-6)


def test_float_arithmetic_activations_agree_with_the_reference(tmp_path):
    """The arithmetic with a number that a table may name (``x + a``, ``a − x``, ``x · a``, ``x / a``, ``a / x``)
    as float ``activation`` ops of an IR file, in TVM's float32."""
    g, x = arithmetic_activations()
    model = runtime.load(build(g, CPU, tmp_path, float_dtype="float32").path)
    np.testing.assert_allclose(model(x)[0], reference.run(g, x)[g.outputs[0]], rtol=1e-6)


def test_dyadic_requantization_is_bit_exact(tmp_path):
    from qcompile.passes import LowerInteger

    from qcompile.pipeline import Pipeline

    res = _lowered(TinyNet(), "int8")
    Pipeline([LowerInteger(dyadic=True)]).run_graph(res.graph_module, res.context)
    ir = res.context.ir
    assert any(op.attrs.get("mode") == "dyadic" for op in ir.ops)
    result = _agreement(ir, runtime.load(build(ir, CPU, tmp_path).path), _images(16))
    assert result["identical_fraction"] == 1.0 and result["top1_agreement"] == 1.0


def test_four_bit_weights_are_stored_packed_and_unpacked_exactly(tmp_path):
    codes = np.array([-7, 7, 0, -1, 3, -6, 5], dtype=np.int32)
    packed = int4.pack(codes).view(np.int8)
    lo, hi = (packed << 4).astype(np.int8) >> 4, packed >> 4
    assert np.array_equal(np.stack([lo, hi], 1).reshape(-1)[:7], codes)
    ir = _lowered(ModuleNet(), "int4").context.ir
    art = build(ir, CPU, tmp_path)
    meta = json.loads((art.path / "meta.json").read_text())
    with np.load(art.path / "params.npz") as params:
        sizes = {name: params[f"p{i}"].size for i, name in enumerate(meta["params"])}
    four_bit = [n for n, t in ir.values.items() if n in ir.constants and t.dtype.bits == 4]
    assert four_bit and all(sizes[n] == (ir.constants[n].size + 1) // 2 for n in four_bit)
    result = _agreement(ir, runtime.load(art.path), _images(16))
    assert result["identical_fraction"] == 1.0 and result["top1_agreement"] == 1.0


def test_fixed_batch_artifact_runs_any_number_of_images(tmp_path):
    ir = _lowered(TinyNet(), "mostly4bit").context.ir
    model = runtime.load(build(ir, CPU, tmp_path, batch=4).path)
    assert model.batch == 4
    result = _agreement(ir, model, _images(10))
    assert result["images"] == 10 and result["identical_fraction"] == 1.0


def test_artifact_runs_with_the_runtime_library_only(tmp_path):
    ir = _lowered(TinyNet(), "int8").context.ir
    art = build(ir, CPU, tmp_path)
    x = _images(6)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from qcompile.backends.tvm import runtime\n"
        "out = runtime.load(sys.argv[1])(np.load(sys.argv[2]))[0]\n"
        "np.save(sys.argv[3], out)\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libtvm_runtime' in maps and 'libtvm_compiler' not in maps, 'compiler library was loaded'\n"
        "try:\n"
        "    from tvm import relax\n"
        "except Exception:\n"
        "    print('no relax')\n"
    )
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(art.path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no relax" in proc.stdout  # really the runtime-only package
    ref = reference.run(ir, x)[ir.outputs[0]]
    assert np.array_equal(np.load(tmp_path / "y.npy"), ref)


# an int8 tensor-core GEMM in the CUDA and in the PTX: dlight's wmma or, where a tuning table picks it, mma.sync
TENSOR_CORE_CUDA = re.compile(r"wmma::mma_sync|mma\.sync\.aligned\.m16n8k32\.row\.col\.s32\.s8\.s8\.s32")
TENSOR_CORE_PTX = re.compile(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.s32\.s8\.s8\.s32"
                             r"|mma\.sync\.aligned\.m16n8k32\.row\.col\.s32\.s8\.s8\.s32")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_builds_put_every_int8_layer_on_tensor_cores(tmp_path):
    """mostly4bit TinyNet: 8-bit stem and head, a 4-bit body conv (unpacked to int8 for the mma)."""
    from qcompile.backends.tvm.cuda import nvcc

    ir = _lowered(TinyNet(), "mostly4bit").context.ir
    layers = [op for op in ir.ops if op.kind in ("conv2d", "dense")]
    gencode = {"sm80": ["arch=compute_80,code=sm_80", "arch=compute_80,code=compute_80"],
               "sm90": ["arch=compute_90,code=sm_90"]}
    for name in ("sm80", "sm90"):
        art = build(ir, name, tmp_path, batch=32)
        source = (art.path / "kernels.cu").read_text()
        meta = json.loads((art.path / "meta.json").read_text())
        assert meta["cuda"]["source_sha256"] == hashlib.sha256(source.encode()).hexdigest()
        assert meta["cuda"]["gencode"] == gencode[name]
        assert (art.path / "model.fatbin").stat().st_size > 0 and (art.path / "model.so").is_file()
        mma = [k for k, body in kernel_bodies(source).items() if TENSOR_CORE_CUDA.search(body)]
        assert len(mma) == len(layers), (name, mma)  # one tensor-core kernel per conv/dense, epilogue fused
        ptx = nvcc(source, get_target(name), "ptx").decode()
        assert len(TENSOR_CORE_PTX.findall(ptx)) >= len(layers)
        # 4-bit weights are stored as int8 codes for CUDA: no kernel unpacks nibbles on every call (nor can repeat
        # the promotion bug that once kept the whole byte: CUDA C promotes int8 to int before a shift)
        assert not [k for k in kernel_bodies(source) if "bitwise" in k] and "(signed char)15)" not in source


class ConvChain(nn.Module):
    """conv → BN → ReLU → 3x3 conv (padded) → ReLU → 1x1 conv → pool → fc: each uint8 activation between two
    convs is read by a conv alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


SHIFT_ONLY = re.compile(r"fused_(pad\d*_)?cast\d*_subtract\d*_cast\d*_kernel")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_int8_vectors_nvcc_rejects_are_repaired_byte_for_byte(tmp_path):
    """0.27 writes a 16-lane 8-bit vector as ``make_[u]int4`` of 16 chars; the repair packs four lanes per word,
    lane i in byte i, which a host compiler checks here (CUDA's int4 is four ints in memory order)."""
    from qcompile.backends.tvm.cuda import repair_vectors

    lanes = [-128, -1, 0, 1, 127, 5, -7, 64, 3, -100, 99, 0, -2, 2, 42, -42]
    signed = "make_int4(" + ", ".join(f"(signed char){v}" for v in lanes) + ")"
    unsigned = "make_uint4(" + ", ".join(f"(unsigned char){v % 256}" for v in lanes) + ")"
    repaired = repair_vectors(f"int4 v = {signed};\nuint4 u = {unsigned};\nint4 w = make_int4(1, 2, 3, 4);\n")
    assert repaired.count("\n") == 3 and "make_int4(1, 2, 3, 4)" in repaired
    program = tmp_path / "lanes.cpp"
    program.write_text("#include <cstdio>\nstruct int4 { int x, y, z, w; };\nstruct uint4 { unsigned x, y, z, w; };\n"
                       "int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }\n"
                       "uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }\n"
                       "int main() {\n" + repaired + "const signed char* b = (const signed char*)&v;\n"
                       "const unsigned char* c = (const unsigned char*)&u;\n"
                       "for (int i = 0; i < 16; ++i) printf(\"%d %d \", b[i], c[i]);\n}\n")
    subprocess.run(["g++", "-std=c++17", "-o", str(tmp_path / "lanes"), str(program)], check=True)
    out = [int(v) for v in subprocess.run([str(tmp_path / "lanes")], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert out[0::2] == lanes and out[1::2] == [v % 256 for v in lanes]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_activations_read_only_by_convs_are_written_shifted_by_their_producer(tmp_path):
    """No kernel only shifts (or pads and shifts) a uint8 activation into int8: the producer's epilogue writes
    it shifted, the conv pads it implicitly and a border term corrects the accumulator; the CPU artifact stays
    bit-exact with the reference."""
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    source = (build(ir, "sm90", tmp_path, batch=8).path / "kernels.cu").read_text()
    kernels = kernel_bodies(source)
    assert not [k for k in kernels if SHIFT_ONLY.fullmatch(k)], list(kernels)
    assert sum(bool(TENSOR_CORE_CUDA.search(body)) for body in kernels.values()) == 4
    x = np.random.default_rng(0).standard_normal((5, 3, 12, 12)).astype(np.float32)
    cpu = runtime.load(build(ir, CPU, tmp_path / "cpu").path)
    np.testing.assert_array_equal(cpu(x)[0], reference.run(ir, x)[ir.outputs[0]])


def _vm_function(text: str, name: str) -> list[str]:
    """The kernels a VM function calls, in order, from the executable's text listing."""
    body = text.split(f"@{name}:\n", 1)[1].split("\n@", 1)[0]
    return re.findall(r"call\s+(fused_\w+)", body)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_fixed_batch_cuda_build_replays_its_kernels_as_one_cuda_graph(tmp_path):
    """Batch 1 is launch-bound: every kernel that reads only weights and intermediates is recorded into one CUDA
    graph; the input's quantize and the kernel writing the returned logits stay outside it."""
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    art = build(ir, "sm90", tmp_path, batch=1)
    text = art.executable.as_text()
    captured, outside = _vm_function(text, "main_cuda_graph_capture"), _vm_function(text, "main")
    assert "vm.builtin.cuda_graph.run_or_capture" in text
    assert sum("conv2d" in k for k in captured) == 3 and len(outside) == 2, (captured, outside)
    assert json.loads((art.path / "meta.json").read_text())["cuda"]["graph"] is True
    plain = build(ir, "sm90", tmp_path / "symbolic")  # a symbolic batch is not captured
    assert "cuda_graph" not in plain.executable.as_text()


class ResidualPair(nn.Module):
    """Two residual blocks: in mostly4bit the first sum is quantized twice, to 8 bits for the second add and to
    4 bits for the second block's conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.b1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


QUANTIZE_ONLY = re.compile(r"fused_divide\d*_tir_round\d*_tir_clip\d*_cast\d*(_kernel(_\d+)?)?")
BYTE_ONLY = re.compile(r"fused_cast\d*_(right_shift|bitwise_and)\d*(_subtract\d*)?_cast\d*(_kernel(_\d+)?)?")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_a_sum_quantized_twice_is_written_by_its_producer_in_both_codes(tmp_path):
    """The sum's 8-bit and 4-bit codes travel as one int16 that the producing conv's epilogue writes: no kernel
    quantizes a float sum on its own, none only takes a byte out of the int16 (the add's consumer takes the low
    byte, the reading conv the high one as it loads its input), and the artifacts stay bit-exact with the
    reference."""
    from qcompile.backends.tvm import relax_builder

    ir = _lowered(ResidualPair(), "mostly4bit", size=12).context.ir
    readers = relax_builder._readers(ir)
    assert relax_builder._sibling_quantizes(ir, readers, relax_builder._offset_values(ir, readers))
    kernels = kernel_bodies((build(ir, "sm90", tmp_path, batch=8).path / "kernels.cu").read_text())
    # one is left: the stem's 8-bit codes requantized (DQ -> Q) for the first 4-bit conv, not a sum
    assert len([k for k in kernels if QUANTIZE_ONLY.fullmatch(k)]) == 1, list(kernels)
    assert not [k for k in kernels if BYTE_ONLY.fullmatch(k)], list(kernels)
    assert any("short*" in body.split("{")[0] and ">>" in body for k, body in kernels.items() if "conv2d" in k)
    assert all(TENSOR_CORE_CUDA.search(body) for k, body in kernels.items() if "conv2d" in k or "matmul" in k)
    x = np.random.default_rng(0).standard_normal((9, 3, 12, 12)).astype(np.float32)
    cpu = runtime.load(build(ir, CPU, tmp_path / "cpu").path)
    np.testing.assert_array_equal(cpu(x)[0], reference.run(ir, x)[ir.outputs[0]])


class WideConv(nn.Module):
    """A 128-channel 3x3 conv at 28x28 (ResNet-50's layer2): dlight's Matmul tries its own int8 tensorization
    there (every GEMM dimension > 64) and raises "not a stage pipeline"."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 128, 1)
        self.conv = nn.Conv2d(128, 128, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.relu(self.stem(x))))


class PoolNet(nn.Module):
    """ResNet's pools: a 3x3 max pool after the stem, a global average pool over 8x8 before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.pool(torch.relu(self.conv(x)))), 1))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_pools_reduce_in_one_thread_per_output(tmp_path):
    """dlight's reduction rules gave every pooled element a 256-thread block and a warp-shuffle reduction over
    its 9 inputs (49.7 ms of a 114.6 ms ResNet-50 batch on an H100), and its fallback a second kernel for the
    epilogue: each pool is one kernel, its window result in a register."""
    ir = _lowered(PoolNet(), "int8", size=32).context.ir
    source = (build(ir, "sm90", tmp_path, batch=4).path / "kernels.cu").read_text()
    pools = {k: body for k, body in kernel_bodies(source).items() if "pool" in k}
    kinds = sorted("max_pool" if "max_pool" in k else "global_avgpool" for k in pools)
    assert kinds == ["global_avgpool", "max_pool"]
    assert all("_local_ptr[0]" in body and "__shfl" not in body for body in pools.values())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_build_of_a_layer_dlight_cannot_tensorize(tmp_path):
    ir = _lowered(WideConv(), "int8", size=28).context.ir
    art = build(ir, "sm90", tmp_path)  # symbolic batch, as benchmarks/tvm_gpu.py builds
    assert (art.path / "model.so").is_file()


TINY_MODEL_FILE = """
import torch
from tests.conftest import TinyNet, randomize_bn

def build_model():
    torch.manual_seed(0)
    return randomize_bn(TinyNet(), data=torch.randn(16, 3, 16, 16))

def example_input():
    return torch.randn(1, 3, 16, 16)

def calibration_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]

def eval_data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
"""


def test_cli_builds_and_verifies_the_cpu_artifact(tmp_path, capsys, monkeypatch):
    from qcompile.cli import main

    monkeypatch.syspath_prepend(str(ROOT))
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL_FILE)
    out = tmp_path / "out"
    code = main([str(model_file), "--recipe", "mostly4bit", "--verify-size", "32", "--backend", "tvm",
                 "--target", CPU, "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["artifacts"][f"tvm_{CPU}"] == str(out / "tvm" / CPU)
    ver = report["verification"][f"tvm_{CPU.replace('-', '_')}_vs_reference"]
    assert ver == {"images": 32, "top1_agreement": 1.0, "identical_fraction": 1.0, "max_lsb_diff": 0}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_cli_verifies_a_cuda_artifact_where_a_gpu_is_and_says_so_where_none_is(tmp_path, capsys, monkeypatch):
    """Without a GPU the sm90 artifact is built and the report says it is not verified, and how to check it on a
    GPU machine; with one (here the driver's answer and the loaded artifact are stand-ins that run the CPU
    build) it is run against the reference like a CPU artifact."""
    from qcompile.cli import main

    monkeypatch.syspath_prepend(str(ROOT))
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL_FILE)
    argv = [str(model_file), "--recipe", "int8", "--verify-size", "16", "--backend", "tvm", "--target", "sm90",
            "--tvm-batch", "8", "--quiet"]
    monkeypatch.setattr(targets, "cuda_device_count", lambda: 0)
    assert main([*argv, "--out", str(tmp_path / "none")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "none" / "report.json").read_text())
    assert (tmp_path / "none" / "tvm" / "sm90" / "model.fatbin").is_file()
    assert "tvm_sm90_vs_reference" not in report["verification"]
    assert any("TVM sm90 artifact not verified: no NVIDIA GPU" in w for w in report["warnings"])

    cpu_build = build(serialize.load(tmp_path / "none" / "ir"), CPU, tmp_path / "cpu", batch=8).path
    monkeypatch.setattr(targets, "cuda_device_count", lambda: 1)
    loaded = []
    monkeypatch.setattr(runtime, "load",
                        lambda folder, device=None: loaded.append(folder) or runtime.TvmModel(cpu_build))
    assert main([*argv, "--out", str(tmp_path / "gpu")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "gpu" / "report.json").read_text())
    assert [Path(f).name for f in loaded] == ["sm90"]
    assert report["verification"]["tvm_sm90_vs_reference"]["identical_fraction"] == 1.0
    assert not any("not verified" in w for w in report["warnings"])


def test_cli_without_tvm_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    from qcompile.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else real(name, *a))
    code = main([str(ROOT / "examples" / "resnet20_cifar.py"), "--recipe", "int8", "--calib-size", "16",
                 "--eval-size", "16", "--verify-size", "16", "--backend", "tvm", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install 'qcompile[tvm]'" in err


def test_cli_builds_a_fixed_batch_artifact(tmp_path, capsys, monkeypatch):
    """--tvm-batch 16: the artifact is compiled for 16 images; 40 verified images run as 16 + 16 + 8 (padded)."""
    from qcompile.cli import main

    monkeypatch.syspath_prepend(str(ROOT))
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL_FILE.replace("for _ in range(2)", "for _ in range(3)"))
    out = tmp_path / "out"
    code = main([str(model_file), "--recipe", "int8", "--verify-size", "40", "--backend", "tvm", "--target", CPU,
                 "--tvm-batch", "16", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "tvm" / CPU / "meta.json").read_text())["batch"] == 16
    ver = json.loads((out / "report.json").read_text())["verification"][f"tvm_{CPU.replace('-', '_')}_vs_reference"]
    assert ver["images"] == 40 and ver["identical_fraction"] == 1.0


def test_tvm_batch_without_the_tvm_backend_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from qcompile.cli import main

    monkeypatch.syspath_prepend(str(ROOT))
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL_FILE)
    code = main([str(model_file), "--recipe", "int8", "--tvm-batch", "16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "--tvm-batch apply to --backend tvm" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize(("target", "recipe"), [("sm90", "int8"), ("sm90", "mostly4bit"), ("sm80", "int8")])
def test_resnet50_cuda_builds_run_every_layer_on_tensor_cores(target, recipe, tmp_path):
    """ResNet-50 at batch 256, as benchmarks/tvm_gpu.py builds it: every conv and the fc on tensor cores (the
    stem's 3 input channels included), no kernel that only shifts activations, only quantizes a float sum or only
    takes a byte out of a joint int16, and no 4-bit weight unpacking: 40 kernels for either recipe."""
    from qcompile.backends.tvm.cuda import nvcc
    from qcompile.models import resnet50

    from benchmarks._common import lowered

    torch.manual_seed(0)
    ir = lowered(resnet50(), recipe)
    art = build(ir, target, tmp_path, batch=256)
    source = (art.path / "kernels.cu").read_text()
    kernels = kernel_bodies(source)
    layers = [k for k in kernels if "conv2d" in k or "matmul" in k]
    assert layers and all(TENSOR_CORE_CUDA.search(kernels[k]) for k in layers)
    assert not [k for k in kernels if SHIFT_ONLY.fullmatch(k) or QUANTIZE_ONLY.fullmatch(k) or BYTE_ONLY.fullmatch(k)
                or ("bitwise" in k and "conv2d" not in k)]
    assert len(kernels) == 40  # 37 GEMM functions (convs and the fc), the input's quantize, the two pools
    ptx = nvcc(source, get_target(target), "ptx").decode()
    assert len(TENSOR_CORE_PTX.findall(ptx)) >= len(layers)


class _Exported:
    """An executable whose export behaves as a linker on a full disk does, or writes the library."""

    def __init__(self, failure: str | None = None) -> None:
        self.failure, self.workspace = failure, None

    def export_library(self, path: str, workspace_dir: str) -> None:
        self.workspace = Path(workspace_dir)
        assert self.workspace.is_dir() and self.workspace.parent == Path(path).parent  # not in /tmp
        (self.workspace / "lib0.o").write_bytes(b"object")
        if self.failure:
            raise RuntimeError(f"Compilation error:\n/usr/bin/ld: final link failed: {self.failure}")
        Path(path).write_bytes(b"library")


def test_export_writes_the_library_with_its_object_files_beside_it(tmp_path):
    executable = _Exported()
    tvm_build.export_library(executable, tmp_path / "model.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.so"] and not executable.workspace.exists()


def test_a_link_into_a_full_disk_is_an_os_error_naming_the_library(tmp_path):
    with pytest.raises(OSError) as caught:
        tvm_build.export_library(_Exported(os.strerror(errno.ENOSPC)), tmp_path / "model.so")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / "model.so"))
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_full_for_llvm_is_refused_before_it_ends_the_process(tmp_path, monkeypatch):
    """LLVM calls exit(1) when it cannot write an object file: the export is not tried with too little space."""
    monkeypatch.setattr(tvm_build.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    executable = _Exported()
    with pytest.raises(OSError, match=r"1.0 MiB free, and building a TVM library needs 32 MiB") as caught:
        tvm_build.export_library(executable, tmp_path / "model.so")
    assert caught.value.errno == errno.ENOSPC and executable.workspace is None and list(tmp_path.iterdir()) == []
