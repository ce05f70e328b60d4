"""``--ptq light|advanced`` and ``--recipe auto --budget`` end to end on a tiny model file: the plan is reported,
respects its budget, lowers to the integer IR and verifies bit-exactly; misuse is a one-line error."""

import json

import pytest

from qcompile.cli import main
from tests.test_cli import assert_one_line_error, run

TINY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.body, self.body_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.body_bn(self.body(x)) + x)
        return self.head(x.mean((2, 3)))

def build_model():
    torch.manual_seed(0)
    net = Net()
    for bn in (net.stem_bn, net.body_bn):
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_(0, 0.3)
    return net

def example_input():
    return torch.randn(1, 3, 8, 8)

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]

def calibration_data():
    return _data(1)

def eval_data():
    return _data(2)
"""


@pytest.fixture
def tiny_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return str(path)


def report_of(out):
    return json.loads((out / "report.json").read_text())


def assert_verified(report):
    ver = report["verification"]["reference_vs_fakequant"]
    assert ver["images"] == 48 and ver["identical_fraction"] == 1.0 and ver["max_lsb_diff"] == 0
    assert report["accuracy"]["reference_top1"] == report["accuracy"]["quant_top1"]


def test_advanced_ptq_lowers_and_verifies(tiny_file, tmp_path, capsys):
    code, captured, out = run([tiny_file, "--recipe", "mostly4bit", "--ptq", "advanced", "--adaquant-iters", "30",
                               "--backend", "none"], tmp_path, capsys)
    assert code == 0, captured.err
    report = report_of(out)
    assert [p["name"] for p in report["passes"]] == [
        "assign_precision", "annotate_cost", "bn_tune", "fold_bn", "assign_precision", "annotate_cost",
        "insert_quantizers", "calibrate", "align_add_scales", "adaquant", "bias_correct", "lower_integer"]
    ptq = report["ptq"]
    assert ptq["mode"] == "advanced" and [r["unit"] for r in ptq["adaquant"]["units"]] == ["stem", "body", "head"]
    assert ptq["bn_tune"]["batchnorms"] == 2 and len(ptq["bias_correct"]["layers"]) == 3
    assert_verified(report)
    assert out.name == "out"


def test_advanced_ptq_with_block_adaquant(tiny_file, tmp_path, capsys):
    code, captured, out = run([tiny_file, "--recipe", "mostly4bit", "--ptq", "advanced", "--adaquant-iters", "30",
                               "--adaquant-scope", "block", "--backend", "none"], tmp_path, capsys)
    assert code == 0, captured.err
    report = report_of(out)
    ada = report["ptq"]["adaquant"]
    assert ada["scope"] == "block" and [r["layers"] for r in ada["units"]] == [["stem"], ["body"], ["head"]]
    assert_verified(report)


def test_auto_budget_plan_is_reported_within_budget_and_verifies(tiny_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([tiny_file, "--recipe", "auto", "--budget", "linear=0.4", "--ptq", "light", "--backend", "none",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bn_tune: 2 BatchNorms re-estimated on 48 images" in captured.out
    report = report_of(out)
    mp = report["ptq"]["mixed_precision"]
    assert report["total"]["linear_vs_bf16"] <= 0.4 and mp["plan_cost_vs_bf16"] == report["total"]["linear_vs_bf16"]
    assert {layer["name"]: f"w{layer['w_bits']}a{layer['a_bits']}" for layer in report["layers"]} == mp["plan"]
    assert "mixed_precision" in [p["name"] for p in report["passes"]]
    assert mp["sensitivity_metric"] == "kl"
    assert (f"mixed precision (least kl degradation with linear=0.4): cost {mp['plan_cost_vs_bf16']:.4f} of bf16"
            in captured.out)
    assert "plan: " + ", ".join(f"{k}={v}" for k, v in mp["plan"].items()) in captured.out
    assert_verified(report)


@pytest.mark.parametrize("args, fragment", [
    (["--recipe", "int8", "--budget", "linear=0.3"], "add --recipe auto"),
    (["--recipe", "auto"], "needs either a cost budget"),
    (["--recipe", "auto", "--budget", "linear=0.1"], "cannot be met"),
    (["--recipe", "auto", "--budget", "speed=0.3"], "KIND=RATIO"),
    (["--recipe", "auto", "--budget", "linear=0.5", "--bits", "4,9"], "candidate bit widths"),
    (["--recipe", "bf16", "--ptq", "light"], "choose a quantized recipe"),
    (["--recipe", "mostly4bit", "--ptq", "light", "--adaquant-scope", "block"], "add --ptq advanced"),
    (["--recipe", "mostly4bit", "--adaquant-scope", "block"], "add --ptq advanced"),
])
def test_ptq_misuse_is_a_one_line_error(args, fragment, tiny_file, tmp_path, capsys):
    code, captured, out = run([tiny_file, *args], tmp_path, capsys)
    assert_one_line_error(code, captured, out, fragment)
