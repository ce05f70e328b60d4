"""Every failure a user can act on: exit 2, exactly one stderr line, no traceback, and the output folder of the
previous run untouched (the same files, byte for byte, and nothing left beside it). (Data of another size than
the model's through --data is resized, not an error: tests/test_data.py.)"""

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest

import qcompile.cli.artifacts
import qcompile.train.trainer
from qcompile.artifacts import check_output_dir
from qcompile.cli import main
from qcompile.errors import BitWidthsError, BudgetError, InvalidValueError, OutputDirError
from qcompile.quantization.ptq import parse_bits
from qcompile.search.bit_allocation import parse_budget

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
{layers}

    def forward(self, x):
{forward}

def build_model():
    torch.manual_seed(0)
    model = Net()
{tamper}
    return model

def example_input():
    return torch.randn(1, 3, {size}, {size})

def calibration_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, {data_size}, {data_size}, generator=g), torch.zeros(8, dtype=torch.long))]

eval_data = calibration_data
"""

SMALL = dict(
    layers="        self.conv = nn.Conv2d(3, 8, 3, padding=1)\n        self.bn = nn.BatchNorm2d(8)\n"
           "        self.fc = nn.Linear(8, 4)",
    forward="        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))",
    tamper="", size=8, data_size=8,
)
WIDE_CONV = dict(  # a 4096-channel 7x7 conv after a ReLU: int8 accumulators can overflow
    layers="        self.expand = nn.Conv2d(3, 4096, 1)\n        self.wide = nn.Conv2d(4096, 4, 7)\n"
           "        self.fc = nn.Linear(4, 3)",
    forward="        return self.fc(torch.relu(self.wide(torch.relu(self.expand(x)))).mean((2, 3)))",
    tamper="", size=8, data_size=8,
)
WIDE_DENSE = dict(  # a dense layer with 140,450 inputs after a ReLU
    layers="        self.conv = nn.Conv2d(3, 2, 1)\n        self.fc = nn.Linear(2 * 265 * 265, 3)",
    forward="        return self.fc(torch.relu(self.conv(x)).flatten(1))",
    tamper="", size=265, data_size=265,
)
DENSE_8X8 = dict(
    layers="        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n        self.fc = nn.Linear(4 * 8 * 8, 3)",
    forward="        return self.fc(torch.relu(self.conv(x)).flatten(1))",
    tamper="", size=8, data_size=10,
)

BATCH_1 = {**DENSE_8X8, "data_size": 8,  # runs on example_input() alone
           "forward": "        return self.fc(torch.relu(self.conv(x)).view(1, -1))"}

DICT_OUTPUT = "        return {'logits': self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))}"


def model_file(folder: Path, name: str, **fields: object) -> str:
    path = folder / f"{name}.py"
    path.write_text(MODEL.format(**{**SMALL, **fields}))
    return str(path)


def with_hooks(path: str, hooks: str) -> str:
    """The model file with its data hooks replaced."""
    source = Path(path).read_text()
    Path(path).write_text(source[: source.index("def calibration_data")] + hooks)
    return path


LOG_FORWARD = "        return self.fc(torch.log(self.bn(self.conv(x))).mean((2, 3)))"  # log of negatives: NaN
IMAGES = "torch.randn(8, 3, 8, 8)"
LABELS_PAST_LOGITS = f"def calibration_data():\n    return [({IMAGES}, torch.arange(8) % 6)]\n"
EVAL_IMAGES_ALONE = f"def calibration_data():\n    return [{IMAGES}]\n\ndef eval_data():\n    return [{IMAGES}]\n"
DICT_BATCHES = f"def calibration_data():\n    return [{{'image': {IMAGES}, 'label': torch.zeros(8)}}]\n"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder, and every entry beside it (staging or backup leftovers would show)."""
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    files["<siblings>"] = " ".join(sorted(p.name for p in folder.parent.iterdir()))
    return files


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A complete earlier run in the output folder, which no failing run may touch."""
    root = tmp_path_factory.mktemp("runs")
    out = root / "out"
    good = model_file(root, "good")
    assert main([good, "--recipe", "int8", "--verify-size", "8", "--out", str(out), "--quiet"]) == 0
    return root, out


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments before --out, a fragment of the one line)."""
    flat = tmp / "flat"
    flat.mkdir()
    (tmp / "notes.txt").write_text("not an archive")
    (tmp / "fake.tar.gz").write_text("not an archive")
    return {
        "accumulator overflow, verified": ([model_file(tmp, "wide", **WIDE_CONV), "--recipe", "int8"],
                                           "layer wide"),
        "accumulator overflow, unverified": ([model_file(tmp, "wide2", **WIDE_CONV), "--recipe", "int8",
                                              "--verify-size", "0"], "int32 accumulator can reach"),
        "dense with 140,450 inputs": ([model_file(tmp, "dense", **WIDE_DENSE), "--recipe", "int8",
                                       "--verify-size", "0"], "layer fc"),
        "example input 8x8, data 16x16": ([model_file(tmp, "small", data_size=16), "--recipe", "int8"],
                                          "(8, 3, 16, 16)"),
        "dense sized for 8x8, data 10x10": ([model_file(tmp, "dense8", **DENSE_8X8), "--recipe", "int8"],
                                            "(1, 3, 8, 8)"),
        "model written for batch size 1": ([model_file(tmp, "batch1", **BATCH_1), "--recipe", "int8"],
                                           "batch1.py:12 `return self.fc(torch.relu"),
        "model returning a dict": ([model_file(tmp, "dict", forward=DICT_OUTPUT), "--recipe", "int8"],
                                   "returns a dict (keys 'logits')"),
        "NaN weight": ([model_file(tmp, "nan_w", tamper="    model.conv.weight.data[0, 0, 0, 0] = float('nan')"),
                        "--recipe", "int8"], "conv.weight"),
        "Inf BatchNorm variance": ([model_file(tmp, "inf_bn", tamper="    model.bn.running_var[3] = float('inf')"),
                                    "--recipe", "int8"], "bn.running_var"),
        "width nan": ([model_file(tmp, "w_nan"), "--width", "nan"], "--width"),
        "width inf": ([model_file(tmp, "w_inf"), "--width", "inf"], "--width"),
        "data not a tarball": ([model_file(tmp, "d1"), "--data", str(tmp / "fake.tar.gz")], "fake.tar.gz"),
        "data a text file": ([model_file(tmp, "d2"), "--data", str(tmp / "notes.txt")], "notes.txt"),
        "data folder without train/ and test/": ([model_file(tmp, "d3"), "--data", str(flat)], "train"),
        "unknown recipe": ([model_file(tmp, "r"), "--recipe", "int3"], "int3"),
        "missing model file": ([str(tmp / "nope.py")], "nope.py"),
        "TorchScript model": ([model_file(tmp, "scripted", tamper="    model = torch.jit.script(model.eval())"),
                               "--recipe", "int8"], "is a TorchScript module (RecursiveScriptModule"),
        "labels past the model's logits": ([with_hooks(model_file(tmp, "l6"), LABELS_PAST_LOGITS)],
                                           "the calibration labels run from 0 to 5 but the model gives 4 logits"),
        "evaluation images without labels": ([with_hooks(model_file(tmp, "unlabelled"), EVAL_IMAGES_ALONE)],
                                             "eval_data() yields a Tensor; it must yield (inputs, labels) pairs"),
        "NaN activation on the calibration data": ([model_file(tmp, "logs", forward=LOG_FORWARD), "--recipe", "int8"],
                                                   "calibration: log (" + str(tmp / "logs.py") + ":13) is not finite"),
        "batches as dicts": ([with_hooks(model_file(tmp, "dicts"), DICT_BATCHES)],
                             "calibration_data() yields dicts (keys 'image', 'label'); yield (inputs, labels) pairs"),
    }


CASES = ["accumulator overflow, verified", "accumulator overflow, unverified", "dense with 140,450 inputs",
         "example input 8x8, data 16x16", "dense sized for 8x8, data 10x10",
         "model written for batch size 1", "model returning a dict", "NaN weight", "Inf BatchNorm variance",
         "width nan", "width inf", "data not a tarball", "data a text file", "data folder without train/ and test/",
         "unknown recipe", "missing model file", "TorchScript model", "labels past the model's logits",
         "evaluation images without labels", "batches as dicts", "NaN activation on the calibration data"]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_leaves_the_previous_run(case, previous_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    root, out = previous_run
    before = snapshot(out)
    args, fragment = _cases(tmp_path)[case]
    capsys.readouterr()
    code = main([*args, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), captured.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(out) == before


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out, line in ((a_file, f"--out {a_file} is a file, not a folder"),
                      (a_file / "sub", f"cannot create --out {a_file / 'sub'}: {a_file} is not a folder")):
        code = main([str(tmp_path / "missing.py"), "--out", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines == [f"qcompile: error: {line}"]  # named before the model is even loaded
    assert a_file.read_text() == "mine"


def test_a_warning_the_model_raises_each_time_it_runs_is_printed_once(tmp_path, capsys):
    """A deprecated call in a model's forward warns at capture, calibration, evaluation and verification, each
    time from another frame: one line in all."""
    forward = "        __import__('warnings').warn('this call is deprecated', FutureWarning)\n" + SMALL["forward"]
    code = main([model_file(tmp_path, "warns", forward=forward), "--recipe", "int8", "--backend", "none",
                 "--measure", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and err.count("qcompile: warning: this call is deprecated") == 1, err


def test_library_errors_name_the_parameter_not_a_flag(tmp_path):
    """From Python, a bad value is named as the library's parameter, with the value and field as attributes."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for call, kind, field, value in ((lambda: parse_budget("speed=0.3"), BudgetError, "budget", "speed=0.3"),
                                     (lambda: parse_bits("4,x"), BitWidthsError, "bits", "4,x"),
                                     (lambda: check_output_dir(a_file), OutputDirError, "out", a_file)):
        with pytest.raises(kind) as caught:
            call()
        assert isinstance(caught.value, InvalidValueError)
        assert (caught.value.field, caught.value.value) == (field, value)
        assert "--" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("flags, line", [
    (["--recipe", "auto", "--budget", "speed=0.3"],
     "--budget 'speed=0.3': expected KIND=RATIO with KIND one of linear, quadratic, memory, latency, e.g. linear=0.30"),
    (["--recipe", "auto", "--budget", "linear=2"], "--budget 'linear=2': the ratio to the bf16 cost must be in (0, 1]"),
    (["--recipe", "auto", "--budget", "linear=0.5", "--bits", "4,x"],
     "--bits '4,x': expected comma-separated bit widths, e.g. 4,8"),
    (["--set", "conv"], "--set 'conv': expected PATTERN=BITS, e.g. --set 'layer1.*=8'"),
    (["--set", "conv=12"], "--set conv=12: weight bit width 12 cannot be honoured"),
    (["--recipe", "auto", "--max-degradation", "nan"], "--max-degradation nan: must be a finite number >= 0"),
    (["--recipe", "auto", "--max-degradation", "-0.1"], "--max-degradation -0.1: must be a finite number >= 0"),
    (["--recipe", "auto"], "mixed precision needs either a cost budget (--budget linear=0.30) or a degradation bound "
                           "(--max-degradation)"),
    (["--recipe", "auto", "--budget", "linear=0.5", "--max-degradation", "0.1"], "mixed precision needs either a "
     "cost budget (--budget linear=0.30) or a degradation bound (--max-degradation), not both"),
    (["--bits", "2,8"], "--bits sets how --recipe auto chooses widths; add --recipe auto"),
    (["--sensitivity", "loss"], "--sensitivity sets how --recipe auto chooses widths; add --recipe auto"),
    (["--adaquant-iters", "20"], "--adaquant-iters sets how --ptq advanced runs AdaQuant; add --ptq advanced"),
])
def test_the_cli_words_library_errors_in_its_flags(flags, line, tmp_path, capsys):
    code = main([model_file(tmp_path, "m"), *flags, "--out", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"qcompile: error: {line}"), lines


def test_auto_without_a_budget_does_not_say_not_both(tmp_path, capsys):
    code = main([model_file(tmp_path, "m"), "--recipe", "auto", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not both" not in err and "--max-degradation" in err, err


def test_sigterm_stops_a_run_in_one_line_and_leaves_nothing(tmp_path):
    """SIGTERM is handled like Ctrl-C: one line, exit status 143, no output folder and no staging folder."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    model = Path(__file__).resolve().parents[1] / "examples" / "resnet20_cifar.py"
    proc = subprocess.Popen([sys.executable, "-m", "qcompile", str(model), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # imported (the handler is set) and well inside the run, which takes tens of seconds
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "qcompile: terminated", err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_the_previous_run(previous_run, capsys, monkeypatch):
    """Writing the run into a full disk (here the IR's arrays, as np.savez closes its zip) stops in one line, and
    the previous run stays whole."""
    def full(ir, folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    root, out = previous_run
    before = snapshot(out)
    monkeypatch.setattr(qcompile.cli.artifacts, "save_ir", full)
    code = main([str(root / "good.py"), "--recipe", "int8", "--verify-size", "8", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"qcompile: error: cannot write --out {out}: No space left on device", err
    assert snapshot(out) == before


BACKEND_FAILURES = {  # module, the call that fails, the flags that reach it, the line (the module's version filled in)
    "a schedule inside tvm.compile": (
        "tvm", "compile", ["--backend", "tvm", "--target", "cpu"],
        "TVM could not compile the model for --target cpu: RuntimeError: Check failed: x is false: cannot tile; the "
        "ONNX artifacts do not need TVM (--backend onnx)"),
    "onnxruntime without a kernel": (
        "onnxruntime", "InferenceSession", [],
        "onnxruntime {version} cannot load the ONNX model: RuntimeError: Check failed: x is false: cannot tile; the "
        "TVM artifacts do not need it (--backend tvm)"),
}


@pytest.mark.parametrize("case", list(BACKEND_FAILURES))
def test_a_backend_failure_is_one_line_and_leaves_the_previous_run(case, previous_run, capsys, monkeypatch):
    """A schedule inside TVM that cannot take one of the model's kernels (dlight's assertions, a failed check in
    its C++), or onnxruntime refusing the exported model, stops the run in one line that says what still works,
    not in the runtime's traceback."""
    name, call, flags, line = BACKEND_FAILURES[case]
    module = pytest.importorskip(name)

    def fails(*args, **kwargs):
        raise RuntimeError("Check failed: x is false: cannot tile\n  more of the log")

    root, out = previous_run
    before = snapshot(out)
    monkeypatch.setattr(module, call, fails)
    code = main([str(root / "good.py"), "--recipe", "int8", *flags, "--verify-size", "8", "--out", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "qcompile: error: " + line.format(version=module.__version__), err
    assert snapshot(out) == before


def test_a_full_disk_outside_the_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A training run's checkpoint lives in its resumable folder, written file by file: a full disk there is
    named by file."""
    def full(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(qcompile.train.trainer, "save_checkpoint", full)
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-sample.tar.gz"
    out = tmp_path / "train"
    ten_classes = SMALL["layers"].replace("nn.Linear(8, 4)", "nn.Linear(8, 10)")
    model = model_file(tmp_path, "m", layers=ten_classes, size=32, data_size=32)
    code = main(["train", model, "--data", str(data), "--epochs", "1", "--train-size", "32", "--batch-size", "32",
                 "--eval-size", "16", "--verify-size", "0", "--recipe", "int8", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    checkpoint = out / "checkpoint.pt"
    assert code == 2 and err.strip() == f"qcompile: error: cannot write {checkpoint}: No space left on device", err


def test_training_data_of_more_classes_than_logits_is_one_line_before_training(tmp_path, capsys):
    """A label past the last logit stopped training with an IndexError traceback from cross_entropy."""
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-sample.tar.gz"
    code = main(["train", model_file(tmp_path, "four", size=32, data_size=32), "--data", str(data), "--epochs", "1",
                 "--train-size", "32", "--batch-size", "32", "--eval-size", "16", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"qcompile: error: the training labels run from \d to 9 \(10 classes\) but the model gives 4 "
                        r"logits per image, which labels index: is the data for another model\?", lines[0]), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["bf16", "int8"])
def test_training_that_diverges_stops_in_one_line(recipe, tmp_path, capsys):
    """A learning rate far too high trained to NaN and wrote a model of NaN with its scores (or, quantized, stopped
    with "an activation quantizer observed a value that is not finite")."""
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-sample.tar.gz"
    ten_classes = SMALL["layers"].replace("nn.Linear(8, 4)", "nn.Linear(8, 10)")
    model = model_file(tmp_path, "m", layers=ten_classes, size=32, data_size=32)
    code = main(["train", model, "--data", str(data), "--epochs", "2", "--train-size", "64", "--batch-size", "32",
                 "--eval-size", "16", "--recipe", recipe, "--lr", "1e30", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.fullmatch(r"qcompile: error: training diverged in epoch \d of 2: (its mean loss is nan|an activation "
                        r"became NaN or inf at step \d+); train with a lower --lr \(now 1e\+30\)",
                        err.strip().splitlines()[-1]), err


NEGATIVE = "--calib-size, --eval-size, --verify-size, --calib-seed and --adaquant-iters must not be negative"
NEGATIVE_TRAIN = "--train-size, --eval-size, --train-eval-size and --verify-size must not be negative"


@pytest.mark.parametrize("command, flags, line", [
    ("compile", ["--batch-size", "0"], "--batch-size must be at least 1"),  # was range()'s ValueError traceback
    ("compile", ["--verify-size", "-1"], NEGATIVE),
    ("compile", ["--calib-seed", "-1"], NEGATIVE),  # was numpy's ValueError traceback
    ("compile", ["--adaquant-iters", "-5", "--ptq", "advanced"], NEGATIVE),
    ("train", ["--lr", "-1"], "--lr must be a positive number, got -1.0"),  # was SGD's ValueError traceback
    ("train", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("train", ["--lr", "0"], "--lr must be a positive number, got 0.0"),
    ("train", ["--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
    ("train", ["--weight-decay", "-1"], "--weight-decay must be a number >= 0, got -1.0"),
    ("train", ["--train-size", "-5"], NEGATIVE_TRAIN),  # trained on all images but 5
    ("sweep", ["--train-eval-size", "-1"], NEGATIVE_TRAIN),
])
def test_flags_out_of_range_are_one_line_before_any_work(command, flags, line, tmp_path, capsys):
    model = model_file(tmp_path, "m")
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-sample.tar.gz"
    argv = [model] if command == "compile" else [command, model, "--data", str(data)]
    code = main([*argv, *flags, "--out", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"qcompile: error: {line}"], lines
    assert not (tmp_path / "out").exists()
