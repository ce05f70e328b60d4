"""The CLI end to end on the bundled examples, and every user error as one line with a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile.cli import main
from qcompile.models import resnet18, resnet20_cifar, resnet50

ROOT = Path(__file__).resolve().parents[1]
R20 = str(ROOT / "examples" / "resnet20_cifar.py")
R18 = str(ROOT / "examples" / "resnet18.py")

UNTRACEABLE = """
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return x * 2

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))

def build_model():
    return Net()

def example_input():
    return torch.randn(1, 3, 8, 8)
"""


FAST = ["--calib-size", "64", "--eval-size", "100", "--verify-size", "50"]


def run(args, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([*args, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    return code, captured, out


def assert_one_line_error(code, captured, out, *fragments):
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), captured.err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists() or not any(out.iterdir()), "no artifact may be written on error"


def test_main_job_writes_report(tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "mostly4bit", *FAST], tmp_path, capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert {"model", "recipe", "width", "layers", "total", "accuracy", "verification"} <= set(report)
    assert report["recipe"] == "mostly4bit" and report["width"] == 1.0
    layer_keys = {"name", "op", "macs", "w_bits", "a_bits", "a_signed", "linear", "quadratic", "memory_bits"}
    assert all(layer_keys <= set(layer) for layer in report["layers"])
    total_keys = {"macs", "params", "linear", "quadratic", "memory_bits", "linear_vs_bf16", "quadratic_vs_bf16",
                  "memory_vs_bf16"}
    assert total_keys <= set(report["total"])
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert len(by_name) == 22 and by_name["conv1"]["w_bits"] == 8 and by_name["fc"]["w_bits"] == 8
    assert by_name["layer2.0.shortcut.0"]["w_bits"] == 4 and by_name["layer2.0.shortcut.0"]["a_signed"] is False
    assert report["total"]["macs"] == sum(layer["macs"] for layer in report["layers"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_table_is_printed(tmp_path, capsys):
    assert main([R20, "--recipe", "int8", "--out", str(tmp_path), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "vs bf16" in printed and "0.5000" in printed
    assert "top-1 on 100 images" in printed and "integer reference vs fake-quant on 50 images" in printed


def test_model_args_width_overrides_and_dump(tmp_path, capsys):
    (tmp_path / "o.toml").write_text('"layer4.*" = "w8a8"\n')
    code, captured, out = run(
        [R18, "--model-arg", "stem=cifar", "--recipe", "mostly4bit", "--width", "0.5",
         "--overrides", str(tmp_path / "o.toml"), "--set", "layer1.*=bf16", "--dump-after", "fold_bn"],
        tmp_path, capsys)
    assert code == 0, captured.err
    assert "--- graph after fold_bn ---" in captured.out
    report = json.loads((out / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["layer4.1.conv2"]["w_bits"] == 8 and layers["layer1.0.conv1"]["w_bits"] == 16
    assert layers["layer2.0.conv1"]["w_bits"] == 4
    assert report["width"] == 0.5 and report["total"]["linear_vs_bf16_width1"] < report["total"]["linear_vs_bf16"]


def test_weights_load_including_wrapped_checkpoints(tmp_path, capsys):
    model = resnet20_cifar()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    for ckpt in ("plain.pt", "ddp.pt"):
        code, captured, _ = run([R20, "--recipe", "bf16", "--weights", str(tmp_path / ckpt)], tmp_path, capsys)
        assert code == 0, captured.err


def test_state_dict_names_match_torchvision():
    keys18, keys50 = resnet18().state_dict(), resnet50().state_dict()
    assert (len(keys18), len(keys50)) == (122, 320)  # torchvision's resnet18 / resnet50 state-dict sizes
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "fc.bias"):
        assert key in keys18
    assert "layer1.0.conv3.weight" in keys50 and "layer1.0.downsample.0.weight" in keys50


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_file", ["does not exist"]),
        ("not_python", ["is not a .py file"]),
        ("syntax_error", ["failed to import", "SyntaxError", "bad.py:2"]),
        ("no_build_model", ["defines no build_model()"]),
        ("no_example_input", ["defines no example_input()"]),
        ("build_raises", ["build_model() failed", "RuntimeError: boom"]),
        ("unknown_model_arg", ["takes no argument 'depth'"]),
        ("malformed_model_arg", ["expected KEY=VALUE"]),
        ("bad_recipe", ["unknown recipe 'int3'"]),
        ("set_matches_nothing", ["'layer9.*'", "matches no layer"]),
        ("set_unhonourable", ["cannot be honoured"]),
        ("missing_checkpoint", ["checkpoint", "does not exist"]),
        ("mismatched_checkpoint", ["does not match the model", "shape mismatches"]),
        ("unsafe_checkpoint", ["weights_only=True"]),
        ("not_a_state_dict", ["not a state dict"]),
        ("untraceable", ["cannot trace the model in module 'gate'", "--leaf-module gate"]),
        ("weights_with_width", ["--weights cannot be combined with --width"]),
        ("bad_example_input", ["example input does not run"]),
        ("uint8_example_input", ["example_input() returns a uint8 tensor", "takes float32 inputs"]),
        ("unknown_dump_pass", ["cannot dump after nope"]),
        ("bad_overrides_file", ["not valid TOML"]),
    ],
)
def test_user_errors_are_one_line(case, fragments, tmp_path, capsys):
    ckpt = str(tmp_path / "w.pt")
    # every case writes its own files, since all entries of this table are built eagerly
    args = {
        "missing_file": [str(tmp_path / "nope.py")],
        "not_python": [_write(tmp_path, "model.txt", "x")],
        "syntax_error": [_write(tmp_path, "bad.py", "import torch\ndef build_model(:\n")],
        "no_build_model": [_write(tmp_path, "no_build.py", "def example_input():\n    pass\n")],
        "no_example_input": [_write(tmp_path, "no_input.py", "def build_model():\n    pass\n")],
        "build_raises": [_write(tmp_path, "raises.py", "def build_model():\n    raise RuntimeError('boom')\n"
                                                  "def example_input():\n    pass\n")],
        "unknown_model_arg": [R20, "--model-arg", "depth=32"],
        "malformed_model_arg": [R20, "--model-arg", "width"],
        "bad_recipe": [R20, "--recipe", "int3"],
        "set_matches_nothing": [R20, "--set", "layer9.*=8"],
        "set_unhonourable": [R20, "--set", "layer1.*=12"],
        "missing_checkpoint": [R20, "--weights", ckpt],
        "mismatched_checkpoint": [R20, "--weights", ckpt],
        "unsafe_checkpoint": [R20, "--weights", ckpt],
        "not_a_state_dict": [R20, "--weights", ckpt],
        "untraceable": [_write(tmp_path, "u.py", UNTRACEABLE)],
        "weights_with_width": [R20, "--weights", ckpt, "--width", "2"],
        "bad_example_input": [_write(tmp_path, "s.py", "import torch\nfrom qcompile.models import resnet20_cifar\n"
                                      "def build_model():\n    return resnet20_cifar()\n"
                                      "def example_input():\n    return torch.randn(1, 1, 32, 32)\n")],
        "uint8_example_input": [_write(tmp_path, "u8.py", "import torch\nfrom qcompile.models import resnet20_cifar\n"
                                       "def build_model():\n    return resnet20_cifar()\n"
                                       "def example_input():\n"
                                       "    return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)\n")],
        "unknown_dump_pass": [R20, "--dump-after", "nope"],
        "bad_overrides_file": [R20, "--overrides", _write(tmp_path, "o.toml", "= =")],
    }[case]
    if case == "mismatched_checkpoint":
        torch.save(resnet20_cifar(width=0.5).state_dict(), ckpt)
    elif case == "unsafe_checkpoint":
        torch.save({"opt": torch.optim.SGD(resnet20_cifar().parameters(), lr=0.1)}, ckpt)
    elif case == "not_a_state_dict":
        torch.save([torch.zeros(3)], ckpt)
    code, captured, out = run(args, tmp_path, capsys)
    assert_one_line_error(code, captured, out, *fragments)


def test_leaf_module_option_makes_untraceable_model_compile(tmp_path, capsys):
    code, captured, _ = run([_write(tmp_path, "u.py", UNTRACEABLE), "--leaf-module", "gate", "--recipe", "int8"],
                            tmp_path, capsys)
    assert code == 0, captured.err


def test_console_entry_point_exits_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompile", str(tmp_path / "nope.py")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qcompile: error: model file {tmp_path / 'nope.py'} does not exist"


SAMPLE = str(ROOT / "examples" / "data" / "cifar10-sample.tar.gz")


def test_data_flag_calibrates_and_reports_accuracy(tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "int8", "--data", SAMPLE, "--calib-size", "64", "--eval-size", "200",
                               "--calibrator", "percentile", "--verify-size", "20"], tmp_path, capsys)
    assert code == 0, captured.err
    acc = json.loads((out / "report.json").read_text())["accuracy"]
    assert acc["n"] == 200 and acc["calibration_images"] == 64
    assert 0.0 <= acc["quant_top1"] <= 1.0 and 0.0 <= acc["float_top1"] <= 1.0


def test_model_file_data_hooks_are_the_default(tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "mostly4bit", "--calib-size", "128", "--eval-size", "100",
                               "--verify-size", "0"], tmp_path, capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert "verification" not in report and (out / "ir").is_dir()
    acc = report["accuracy"]
    assert acc["n"] == 100 and acc["calibration_images"] == 128


def test_integer_ir_is_written_and_verified(tmp_path, capsys, monkeypatch):
    from qcompile.ir import reference
    from qcompile.ir.serialize import load

    interpreted = []
    real_run = reference.run
    monkeypatch.setattr(reference, "run", lambda ir, x, **kw: interpreted.append(len(x)) or real_run(ir, x, **kw))
    code, captured, out = run([R20, "--recipe", "mostly4bit", "--calib-size", "64", "--eval-size", "100"],
                              tmp_path, capsys)
    assert code == 0, captured.err
    assert sum(interpreted) == 100  # one interpreter pass serves the fake-quant and both ONNX comparisons
    report = json.loads((out / "report.json").read_text())
    ver = report["verification"]["reference_vs_fakequant"]
    assert ver["images"] == 100 and ver["top1_agreement"] == 1.0
    assert ver["identical_fraction"] == 1.0 and ver["max_lsb_diff"] == 0
    assert report["accuracy"]["reference_top1"] == report["accuracy"]["quant_top1"]
    ir = load(out / "ir")
    assert report["artifacts"]["ir"] == str(out / "ir")
    assert {op.kind for op in ir.ops} >= {"quantize", "conv2d", "requantize", "add", "dense"}
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    from qcompile.backends.host import u8s8_pairs_saturate  # where int8 weights would not be exact: uint8 ones

    assert report["onnx_weight_type"]["chosen"] == ("uint8" if u8s8_pairs_saturate() else "int8")
    for flavour, name in (("serving", "model.onnx"), ("compact", "model.compact.onnx")):
        assert report["artifacts"][f"onnx_{flavour}"] == str(out / name) and (out / name).is_file()
        onnx_ver = report["verification"]["onnx_vs_reference"][flavour]
        assert onnx_ver["images"] == 100 and onnx_ver["top1_agreement"] >= 0.99
        if flavour == "serving":  # integer kernels: exact; compact runs float convolutions
            assert onnx_ver["identical_fraction"] == 1.0 and onnx_ver["max_lsb_diff"] == 0


def test_onnx_mismatch_fails_with_a_per_layer_diff(tmp_path, capsys, monkeypatch):
    from qcompile.backends import onnx as qonnx

    real = qonnx.compare_with_reference

    def skewed(ir, model, pairs):
        result = real(ir, model, pairs)
        return dict(result, identical_fraction=0.9, max_lsb_diff=3)

    monkeypatch.setattr(qonnx, "compare_with_reference", skewed)
    code, captured, out = run([R20, "--recipe", "int8", *FAST], tmp_path, capsys)
    assert code == 2
    line = captured.err.strip()
    assert "\n" not in line and "onnxruntime (serving) disagrees with the integer reference" in line
    kept = tmp_path / "out.qcompile-failed"  # the failed run, beside --out: out holds complete runs only
    assert not out.exists() and f"run kept in {kept}" in line
    report = json.loads((kept / "report.json").read_text())
    layers = report["verification"]["onnx_vs_reference"]["serving"]["layers"]
    assert layers and all({"name", "identical_fraction", "max_lsb_diff"} <= set(row) for row in layers)
    assert report["artifacts"]["onnx_serving"] == str(kept / "model.onnx") and (kept / "model.onnx").is_file()


def test_backend_none_skips_onnx(tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "int8", "--backend", "none", *FAST], tmp_path, capsys)
    assert code == 0, captured.err
    assert not (out / "model.onnx").exists() and (out / "ir").is_dir()


def test_image_folder_directory(tmp_path, capsys):
    import tarfile

    with tarfile.open(SAMPLE) as tar:
        tar.extractall(tmp_path / "data", filter="data")
    code, captured, out = run([R20, "--recipe", "int8", "--data", str(tmp_path / "data" / "cifar10"),
                               "--calib-size", "32", "--eval-size", "50", "--verify-size", "10"], tmp_path, capsys)
    assert code == 0, captured.err
    assert json.loads((out / "report.json").read_text())["accuracy"]["n"] == 50


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--data", SAMPLE, "--calib-size", "0"], "calibration set is empty"),
        (["--data", "/nonexistent/cifar.tar.gz"], "does not exist"),
        (["--calibrator", "median"], "unknown calibrator 'median'"),
    ],
)
def test_data_errors(args, fragment, tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "int8", *args], tmp_path, capsys)
    assert_one_line_error(code, captured, out, fragment)


def test_dyadic_lowering_skips_onnx_with_a_warning(tmp_path, capsys):
    code, captured, out = run([R20, "--recipe", "int8", "--dyadic", *FAST], tmp_path, capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert any("dyadic" in w for w in report["warnings"]) and not (out / "model.onnx").exists()
    assert json.loads((out / "ir" / "graph.json").read_text())["metadata"]["requantize"] == "dyadic"
    (tmp_path / "b").mkdir()
    code, captured, out = run([R20, "--recipe", "int8", "--dyadic", "--backend", "onnx", *FAST], tmp_path / "b",
                              capsys)
    assert_one_line_error(code, captured, out, "--backend onnx cannot carry --dyadic")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("out_is_a_file", "is a file, not a folder"),
        ("out_under_a_file", "is not a folder"),
        ("out_is_a_users_folder", "is a folder without report.json"),
        ("width_nan", "--width must be a positive number, got nan"),
        ("width_inf", "--width must be a positive number, got inf"),
    ],
)
def test_out_and_width_are_checked_before_any_work(case, fragment, tmp_path, capsys):
    somefile, users = tmp_path / "somefile", tmp_path / "mine"
    somefile.write_text("kept")
    users.mkdir()
    (users / "notes.txt").write_text("kept")
    out = {"out_is_a_file": somefile, "out_under_a_file": somefile / "sub", "out_is_a_users_folder": users}.get(
        case, tmp_path / "out")
    width = {"width_nan": "nan", "width_inf": "inf"}.get(case, "1")
    # a model file that does not exist: the error must come before it is loaded
    code = main([str(tmp_path / "missing.py"), "--width", width, "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr(), tmp_path / "out", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "somefile"]
    assert somefile.read_text() == "kept" and [p.name for p in users.iterdir()] == ["notes.txt"]


def test_a_rerun_replaces_the_whole_folder_and_its_report_lists_every_file(tmp_path, capsys):
    from hashlib import sha256

    from tests.test_ptq_cli import TINY  # test_ptq_cli imports this module: not at the top

    model = _write(tmp_path, "tiny.py", TINY)
    code, captured, out = run([model, "--recipe", "mostly4bit", "--verify-size", "16"], tmp_path, capsys)
    assert code == 0, captured.err
    assert (out / "model.onnx").is_file()
    code, captured, out = run([model, "--recipe", "int8", "--backend", "none", "--verify-size", "16"], tmp_path,
                              capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(files) == {"report.json", "report.html", "ir/graph.json", "ir/tensors.npz"}  # no first-run ONNX
    assert report["files"] == {rel: {"bytes": len(data), "sha256": sha256(data).hexdigest()}
                               for rel, data in files.items() if rel != "report.json"}
    assert report["artifacts"] == {"ir": str(out / "ir")}  # the final folder, not the staging one
    assert json.loads(files["ir/graph.json"])["metadata"]["recipe"] == report["recipe"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.py"]


def test_messages_are_printed_as_they_are_not_as_rich_markup(capsys):
    from qcompile.reporting.report import print_report

    total = {k: 1 for k in ("macs", "params", "linear", "quadratic", "memory_bits", "linear_vs_bf16",
                            "quadratic_vs_bf16", "memory_vs_bf16")}
    layer = {"name": "features[0]", "op": "conv2d", "macs": 1, "w_bits": 8, "a_bits": 8, "a_signed": True,
             "linear": 1, "quadratic": 1, "memory_bits": 8}
    print_report({"model": "models/[v2]/net.py", "recipe": "int8", "width": 1.0, "layers": [layer],
                  "total": total, "warnings": ["ONNX artifacts skipped (pip install 'qcompile[onnx]') :cd:"]})
    printed = capsys.readouterr().out
    assert "warning: ONNX artifacts skipped (pip install 'qcompile[onnx]') :cd:" in printed
    assert "models/[v2]/net.py" in printed and "features[0]" in printed


FEATURES_TOO = """
import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        features = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(features), features

def build_model():
    torch.manual_seed(0)
    return Net()

def example_input():
    return torch.randn(1, 3, 32, 32)
"""


def test_a_model_returning_logits_and_features_is_compiled_and_scored_on_its_logits(tmp_path, capsys):
    model = _write(tmp_path, "features.py", FEATURES_TOO)
    code, captured, out = run([model, "--recipe", "int8", "--data", SAMPLE, *FAST], tmp_path, capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["onnx_vs_reference"]["serving"]["identical_fraction"] == 1.0
    assert report["accuracy"]["n"] == 100 and 0.0 <= report["accuracy"]["float_top1"] <= 1.0


UNLABELLED = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def example_input():
    return torch.randn(1, 3, 8, 8)


def calibration_data():  # images alone, as PT2E's and onnxruntime's calibration loops feed them
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
"""


def test_calibration_images_need_no_labels(tmp_path, capsys):
    """Calibrated and verified on images alone: the reference's top-1 is not claimed without labels."""
    model = tmp_path / "unlabelled.py"
    model.write_text(UNLABELLED)
    assert main([str(model), "--recipe", "int8", "--measure", "0", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    verified = report["verification"]["reference_vs_fakequant"]
    assert verified["images"] == 16 and verified["reference_top1"] is None and verified["identical_fraction"] == 1.0
    assert "integer reference vs fake-quant on 16 images" in printed and "reference top-1" not in printed
