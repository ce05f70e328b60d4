"""Every failure a user can act on: exit 2, exactly one stderr line, no traceback, and the output folder of the
previous run untouched (the same files, byte for byte, and nothing left beside it). (Data of another size than
the model's through --data is resized, not an error: tests/test_data.py.)"""

import hashlib
from pathlib import Path

import pytest

from qcompile.cli import main

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


def model_file(folder: Path, name: str, **fields: object) -> str:
    path = folder / f"{name}.py"
    path.write_text(MODEL.format(**{**SMALL, **fields}))
    return str(path)


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
    }


CASES = ["accumulator overflow, verified", "accumulator overflow, unverified", "dense with 140,450 inputs",
         "example input 8x8, data 16x16", "dense sized for 8x8, data 10x10", "NaN weight", "Inf BatchNorm variance",
         "width nan", "width inf", "data not a tarball", "data a text file", "data folder without train/ and test/",
         "unknown recipe", "missing model file"]


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
    for out in (a_file, a_file / "sub"):
        code = main([str(tmp_path / "missing.py"), "--out", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and str(out) in lines[0]  # named before the model is even loaded
    assert a_file.read_text() == "mine"
