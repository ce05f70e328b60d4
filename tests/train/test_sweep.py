"""``qcompile sweep`` end to end on a tiny model and a few hundred bundled images: CSV, JSON, PNGs, resume."""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompile.cli.train as train_cli
from qcompile.cli import main
from qcompile.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from qcompile.frontend.model_file import load_model_file
from qcompile.train.plots import pareto_front
from qcompile.train.sweep import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "data" / "cifar10-sample.tar.gz"

MODEL = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model():
    return Small()


def example_input():
    return torch.randn(1, 3, 32, 32)
'''

PNGS = ("top1_vs_linear.png", "top1_vs_quadratic.png", "top1_vs_memory.png", "top1_vs_width.png")


def _sweep(model, out, capsys, epochs="1", lr="0.05"):
    code = main(["sweep", str(model), "--data", str(SAMPLE), "--widths", "0.5,1.0", "--recipes", "bf16,int8",
                 "--epochs", epochs, "--batch-size", "64", "--lr", lr, "--train-size", "256", "--eval-size", "200",
                 "--train-eval-size", "128", "--verify-size", "32", "--device", "cpu", "--out", str(out), "--quiet"])
    return code, capsys.readouterr()


def test_tiny_sweep_writes_tables_and_plots_and_resumes(tmp_path, capsys):
    model = tmp_path / "small.py"
    model.write_text(MODEL)
    out = tmp_path / "sweep"
    code, captured = _sweep(model, out, capsys)
    assert code == 0, captured.err
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["width"], r["recipe"]) for r in rows] == [("0.5", "bf16"), ("0.5", "int8"), ("1.0", "bf16"),
                                                         ("1.0", "int8")]
    assert tuple(rows[0]) == COLUMNS
    by = {(float(r["width"]), r["recipe"]): r for r in rows}
    assert float(by[1.0, "bf16"]["linear_cost"]) == 1.0 and float(by[1.0, "bf16"]["memory_cost"]) == 1.0
    assert float(by[1.0, "int8"]["linear_cost"]) == 0.5 and float(by[1.0, "int8"]["quadratic_cost"]) == 0.25
    assert float(by[0.5, "bf16"]["params"]) < float(by[1.0, "bf16"]["params"])
    assert float(by[0.5, "bf16"]["linear_cost"]) < 1.0
    for r in rows:
        assert 0 <= float(r["float_top1"]) <= 1 and int(r["eval_images"]) == 200 and int(r["train_images"]) == 256
        assert float(r["generalization_gap"]) == pytest.approx(float(r["eval_loss"]) - float(r["train_loss"]))
        if r["recipe"] == "bf16":
            assert r["int_top1"] == "" and r["top1"] == r["float_top1"]
        else:  # lowered to the integer IR and checked against the reference interpreter
            assert r["top1"] == r["int_top1"] and int(r["reference_images"]) == 32
            assert float(r["reference_agreement"]) >= 0.95
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["rows"]) == 4 and data["columns"] == list(COLUMNS)
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "w1-int8" / "ir" / "graph.json").exists()

    # a rerun trains nothing; losing one pair's result (an interrupted run) retrains only that pair
    results = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    (out / "runs" / "w0.5-int8" / "result.json").unlink()
    code, captured = _sweep(model, out, capsys)
    assert code == 0, captured.err
    assert captured.out.count("(done before)") == 3
    for p, mtime in results.items():
        assert p.exists() and (p.stat().st_mtime_ns == mtime) == (p.parent.name != "w0.5-int8")
    again = {(r["width"], r["recipe"]): r for r in csv.DictReader((out / "sweep.csv").open())}
    # resumed from its final checkpoint: the same trained model, so the same numbers
    assert again["0.5", "int8"]["int_top1"] == by[0.5, "int8"]["int_top1"]

    # a damaged result (edited by hand) is trained again, with a warning, not a JSONDecodeError traceback
    (out / "runs" / "w1-bf16" / "result.json").write_text('{"broken')
    code, captured = _sweep(model, out, capsys)
    assert code == 0 and captured.out.count("(done before)") == 3, captured.err
    assert f"qcompile: warning: cannot read {out / 'runs' / 'w1-bf16' / 'result.json'}" in captured.err

    code, captured = _sweep(model, out, capsys, epochs="2")  # other settings must not mix into the table
    assert code == 2 and "trained with other settings: epochs 1 (now 2)" in captured.err
    code, captured = _sweep(model, out, capsys, lr="0.1")
    assert code == 2 and "trained with other settings: lr 0.05 (now 0.1)" in captured.err


def test_sweep_rejects_bad_widths_in_one_line(tmp_path, capsys):
    model = tmp_path / "small.py"
    model.write_text(MODEL)
    code = main(["sweep", str(model), "--data", str(SAMPLE), "--widths", "0.5,x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--widths" in err[0]


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.90), (0.5, 0.89), (0.25, 0.85), (0.5, 0.80), (0.3, 0.84), (2.0, 0.88)]
    assert pareto_front(pts) == [(0.25, 0.85), (0.5, 0.89), (1.0, 0.90)]


def test_cifar_resnet18_example_is_the_cifar_stem_model():
    from qcompile.frontend.model_file import load_model_file

    mf = load_model_file(ROOT / "examples" / "resnet18_cifar.py")
    model = mf.build(width=0.5).eval()
    (x,) = mf.example_input()
    assert x.shape == (1, 3, 32, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 32
    assert model(x).shape == (1, 10)


def test_a_profile_adds_the_measured_latency_axis(tmp_path, capsys):
    """With --cost-model measured:PROFILE every row gets its predicted latency relative to float at width 1, and
    the sweep draws top1_vs_latency.png beside the paper's plots."""
    model = tmp_path / "small.py"
    model.write_text(MODEL)
    profile = tmp_path / "profile.json"
    assert main(["profile", str(model), "--widths", "0.5,1.0", "--rounds", "3", "--threads", "1",
                 "--out", str(profile)]) == 0
    out = tmp_path / "sweep"
    code = main(["sweep", str(model), "--data", str(SAMPLE), "--widths", "0.5,1.0", "--recipes", "bf16,int8",
                 "--epochs", "1", "--batch-size", "64", "--train-size", "128", "--eval-size", "64",
                 "--train-eval-size", "64", "--verify-size", "16", "--device", "cpu", "--out", str(out), "--quiet",
                 "--cost-model", f"measured:{profile}"])
    assert code == 0, capsys.readouterr().err
    rows = {(r["width"], r["recipe"]): r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows[(1.0, "bf16")]["latency_cost"] == pytest.approx(1.0)
    assert all(r["latency_cost"] > 0 for r in rows.values())
    assert (out / "top1_vs_latency.png").stat().st_size > 1000


def test_train_reads_data_at_the_example_inputs_size(tmp_path, capsys):
    """A model whose example is 16x16 trained on the 32x32 sample: the images are resized as qcompile MODEL.py
    resizes them, so the lowered model is verified on images of its size (it trained, then stopped with "the
    graph was compiled for (N, 3, 16, 16)")."""
    model = tmp_path / "small16.py"
    model.write_text(MODEL.replace("torch.randn(1, 3, 32, 32)", "torch.randn(1, 3, 16, 16)"))
    out = tmp_path / "train"
    code = main(["train", str(model), "--data", str(SAMPLE), "--epochs", "1", "--batch-size", "32", "--train-size",
                 "64", "--eval-size", "32", "--verify-size", "16", "--recipe", "int8", "--device", "cpu",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "result.json").read_text())
    assert row["reference_images"] == 16 and row["reference_agreement"] >= 0.9


@pytest.mark.parametrize("side, normalize, stats", [(32, None, (CIFAR_MEAN, CIFAR_STD)),
                                                     (40, None, (IMAGENET_MEAN, IMAGENET_STD)),
                                                     (40, "cifar", (CIFAR_MEAN, CIFAR_STD))])
def test_train_normalises_data_as_compile_does(side, normalize, stats, tmp_path):
    """CIFAR statistics for 32x32 images, ImageNet's otherwise, or --normalize: as qcompile MODEL.py --data reads
    the same folder (training used CIFAR's whatever the images)."""
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(tmp_path / "d" / split / cls / "0.png")
    model = tmp_path / "small.py"
    model.write_text(MODEL)
    args = argparse.Namespace(data=str(tmp_path / "d"), train_size=None, eval_size=None, normalize=normalize,
                              train_eval_size=2)
    splits = train_cli._splits(args, torch.device("cpu"), load_model_file(model).build(), (torch.randn(1, 3, 32, 32),))
    expected = [(128 / 255 - m) / s for m, s in zip(*stats)]
    assert splits.train.images[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
