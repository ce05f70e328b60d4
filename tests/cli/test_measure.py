"""``--measure``, ``qcompile profile`` and the measured cost model, end to end on a small model file."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from qcompile.backends.onnx import NODE_SEPARATOR
from qcompile.backends.tvm.targets import host_cpu_target

from qcompile.cli import main
from qcompile.quantization.latency import LatencyProfile
from tests.test_ptq_cli import TINY

LAYERS = ["stem", "body", "head"]


def tiny(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.py").write_text(TINY)
    return str(tmp_path / "tiny.py")


def test_measure_reports_the_artifact_beside_the_float_model_per_layer(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    assert main([tiny(tmp_path, monkeypatch), "--recipe", "int8", "--measure", "5", "--measure-batch", "1,4",
                 "--measure-threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    measured = report["measured"]
    assert measured["threads"] == 1 and measured["rounds"] == 5 and set(measured["batches"]) == {"1", "4"}
    assert all(b["artifact_ms"] > 0 and b["float_ms"] > 0 for b in measured["batches"].values())
    rows = {row["name"]: row for row in measured["layers"]}
    assert [name for name in rows if name in LAYERS] == LAYERS == [layer["name"] for layer in report["layers"]]
    assert rows["stem"]["kernels"][0] == "QLinearConv" and rows["head"]["kernels"][0] == "QGemm"
    assert all(rows[name]["integer"] for name in LAYERS)  # no float fallback in the int8 artifact
    assert "measured (onnx (serving)" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "QLinearConv" in page and "Measured latency" in page
    nodes = onnx.load(out / "model.onnx").graph.node
    assert all(NODE_SEPARATOR in n.name for n in nodes)  # every node named after its IR op


def test_measure_times_a_tvm_cpu_artifact_beside_tvms_float_build(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("tvm")
    out = tmp_path / "out"
    assert main([tiny(tmp_path, monkeypatch), "--recipe", "int8", "--backend", "tvm", "--measure", "3",
                 "--measure-batch", "1,4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    measured = report["measured_tvm"]
    assert "measured" not in report  # no ONNX artifact was built
    target = host_cpu_target()  # the default: the CPU target this machine runs
    assert measured["backend"] == f"tvm ({target})" and set(measured["batches"]) == {"1", "4"}
    assert all(b["artifact_ms"] > 0 and b["float_ms"] > 0 and b["ratio"] > 0 for b in measured["batches"].values())
    assert measured["functions"] and all(f["ms"] >= 0 for f in measured["functions"])
    layers = {row["name"]: row for row in measured["layers"]}  # calls charged to layers by their order
    assert [name for name in layers if name in LAYERS] == LAYERS
    assert all(layers[name]["integer"] and layers[name]["kernels"][0].startswith(("conv2d", "matmul"))
               for name in LAYERS)
    assert f"measured (tvm ({target})" in capsys.readouterr().out


ACTIVATED = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.{act}(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def example_input():
    return torch.randn(1, 3, 8, 8)


def calibration_data():
    return [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))]
"""


def _measured(backend: str, act: str, tmp_path, monkeypatch) -> tuple[dict, dict, Path]:
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.py").write_text(ACTIVATED.format(act=act))
    out = tmp_path / "out"
    assert main([str(tmp_path / "model.py"), "--recipe", "int8", "--backend", backend, "--measure", "3",
                 "--verify-size", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    return report, report["measured" if backend == "onnx" else "measured_tvm"], out


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_a_silu_model_is_timed_beside_its_float_form(backend, tmp_path, monkeypatch) -> None:
    """The artifact tabulates the SiLU on codes; the float model it is timed beside runs the IR's float
    ``activation`` (it failed to lower, and the artifact was timed alone)."""
    report, measured, _ = _measured(backend, "SiLU", tmp_path, monkeypatch)
    assert all(b["artifact_ms"] > 0 and b["float_ms"] > 0 and b["ratio"] > 0 for b in measured["batches"].values())
    assert "float_missing" not in measured and not report["warnings"]


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_a_model_whose_float_form_does_not_lower_is_timed_alone(backend, tmp_path, monkeypatch, capsys) -> None:
    """A Mish has no float IR op (the IR tabulates it on codes): the float model is not built, the artifact is
    timed alone, and the report says so; the run succeeds."""
    report, measured, out = _measured(backend, "Mish", tmp_path, monkeypatch)
    assert all(b["artifact_ms"] > 0 and b["float_ms"] is None and b["ratio"] is None
               for b in measured["batches"].values())
    assert "timed alone" in measured["float_missing"] and measured["float_missing"] in report["warnings"]
    assert "timed alone" in capsys.readouterr().out
    assert ("<td>—</td>" in (out / "report.html").read_text()) == (backend == "onnx")  # the page shows ONNX's


def test_measure_zero_skips_it(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    assert main([tiny(tmp_path, monkeypatch), "--recipe", "int8", "--measure", "0", "--out", str(out)]) == 0
    assert "measured" not in json.loads((out / "report.json").read_text())


def test_a_profile_prices_a_plan_and_bounds_its_latency(tmp_path, monkeypatch, capsys) -> None:
    model = tiny(tmp_path, monkeypatch)
    profile = tmp_path / "profile.json"
    assert main(["profile", model, "--rounds", "5", "--threads", "1", "--out", str(profile)]) == 0
    loaded = LatencyProfile.load(profile)
    assert len(loaded.entries) == 3 and all(set(row) == {"float", "w4a4", "w8a8"} for row in loaded.entries.values())
    assert loaded.meta["batch"] == 1 and set(loaded.meta["end_to_end_ms"]["1"]) == {"float", "w4a4", "w8a8"}
    out = tmp_path / "out"
    # at 8x8 pixels onnxruntime's integer kernels are slower than float ones: the budget allows 10x float
    assert main([model, "--recipe", "auto", "--cost-model", f"measured:{profile}", "--budget", "latency=10",
                 "--measure", "3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    total = report["total"]
    assert 0 < total["latency_vs_float"] <= 10 and all(layer["predicted_ms"] > 0 for layer in report["layers"])
    plan = report["ptq"]["mixed_precision"]
    assert plan["budget"] == "latency=10" and plan["plan_cost"] <= plan["budget_cost"]
    assert plan["plan_cost"] / 1e6 == total["predicted_latency_ms"]
    assert "predicted ms" in capsys.readouterr().out


def test_a_tvm_profile_files_every_layer_shape_per_precision(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("tvm")
    profile = tmp_path / "tvm-profile.json"
    assert main(["profile", tiny(tmp_path, monkeypatch), "--backend", "tvm", "--rounds", "3", "--threads", "1",
                 "--out", str(profile)]) == 0
    loaded = LatencyProfile.load(profile)
    assert loaded.meta["backend"] == f"tvm ({host_cpu_target()})" and loaded.meta["runtime"].startswith("tvm ")
    assert len(loaded.entries) == 3 and all(set(row) == {"float", "w4a4", "w8a8"} for row in loaded.entries.values())
    assert all(ms > 0 for row in loaded.entries.values() for ms in row.values())


def test_a_staged_tvm_profile_is_built_here_and_measured_from_its_folder(tmp_path, monkeypatch, capsys) -> None:
    """--stage builds what a GPU machine measures with TVM's runtime alone (--staged); rehearsed on a CPU target."""
    pytest.importorskip("tvm")
    target = host_cpu_target()
    stage, profile = tmp_path / "stage", tmp_path / "staged.json"
    assert main(["profile", tiny(tmp_path, monkeypatch), "--backend", "tvm", "--target", target,
                 "--stage", str(stage), "--out", str(profile)]) == 0
    plan = json.loads((stage / "plan.json").read_text())
    assert [e["precision"] for e in plan["entries"]] == ["float", "w4a4", "w8a8"] and not profile.exists()
    assert "qcompile profile --staged" in capsys.readouterr().out
    assert main(["profile", "--staged", str(stage), "--rounds", "3", "--out", str(profile)]) == 0
    loaded = LatencyProfile.load(profile)
    assert loaded.meta["backend"] == f"tvm ({target})"
    assert len(loaded.entries) == 3 and all(set(row) == {"float", "w4a4", "w8a8"} for row in loaded.entries.values())


def test_call_names_of_fused_cuda_functions_pair_with_the_ir_layers() -> None:
    """On CUDA, TVM fuses each conv with its epilogue (and sometimes a producer) into one named function."""
    from qcompile.backends.tvm.measure import layer_calls

    from tests.passes.test_lower_integer import ModuleNet, _lowered

    ir = _lowered(ModuleNet(), "int8").context.ir
    layers = [op for op in ir.ops if op.kind in ("conv2d", "dense")]
    names = ["fused_divide_tir_round_tir_clip_cast_transpose", "fused_conv2d_add_cast1_multiply",
             "fused_cast9_bitwise_and_subtract1_cast10_conv2d1_add_cast1", "fused_max_pool2d_cast1",
             *[f"fused_conv2d{i}_add{i}" for i in range(2, len(layers))]][:len(layers) + 2]
    names[-1] = "fused_matmul_add3_cast15_multiply3"
    calls = layer_calls(ir, [(n, 1.0) for n in names])
    assert calls is not None and sum(c.compute for c in calls) == len(layers)
    assert calls[0].ir_op == ir.ops[0].output and calls[-1].ir_op == layers[-1].output


def test_profile_errors_are_one_line(tmp_path, monkeypatch, capsys) -> None:
    model = tiny(tmp_path, monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    cases = [([model, "--backend", "tvm", "--stage", str(mine), "--out", "p.json"], "is a folder without plan.json"),
             (["--out", "p.json"], "give a model file or --staged DIR (the models a --stage run built)\n"),
             ([model, "--staged", str(mine), "--out", "p.json"], "--staged DIR (the models a --stage run built), not both"),
             ([model, "--backend", "tvm", "--target", "sm90", "--out", "p.json"], "--target sm90 cannot run on this"),
             ([model, "--stage", str(tmp_path / "s"), "--out", "p.json"], "--stage builds TVM artifacts"),
             (["--staged", str(tmp_path / "none"), "--out", "p.json"], "not a folder written by --stage")]
    for argv, message in cases:
        assert main(["profile", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # a --stage folder that is not one is left as it was


def test_latency_budget_errors_are_one_line(tmp_path, monkeypatch, capsys) -> None:
    model = tiny(tmp_path, monkeypatch)
    cases = [([model, "--recipe", "auto", "--budget", "latency=0.5"], "--budget latency=R needs a latency profile"),
             ([model, "--cost-model", "linear"], "--cost-model 'linear': expected measured:PROFILE"),
             ([model, "--cost-model", f"measured:{tmp_path / 'none.json'}"], "cannot read latency profile"),
             ([model, "--measure-batch", "0"], "--measure-batch '0': expected positive batch sizes")]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_profiled_times_are_scaled_to_each_models_end_to_end_time() -> None:
    """The profiler's sums overstate the whole: each model's layers and overhead are scaled to its end-to-end
    median, so a uniform plan predicts what its model measured; the overhead is a model's outside time summed."""
    from qcompile.cli.profile import _calibrated, _Entry, _Profiled

    def run(precision, layers, outside):
        r = _Profiled(_Entry(1.0, precision, None, {}))
        for key, ms in layers.items():
            r.layers[key].extend(ms)
        r.outside = outside
        return r

    runs = [run("float", {"a": [1.0, 1.0], "b": [2.0]}, 1.0), run("w8a8", {"a": [0.5, 0.5], "b": [1.0]}, 0.5)]
    profile, scales = _calibrated(runs, {"1": {"float": 2.5, "w8a8": 2.0}})
    assert scales == {"1": {"float": 0.5, "w8a8": 0.8}}
    assert profile.entries == {"a": {"float": 0.5, "w8a8": 0.4}, "b": {"float": 1.0, "w8a8": 0.8}}
    assert profile.overhead == {"float": 0.5, "quantized": 0.4}
    # the whole model at w8a8: 2 layers of shape a, 1 of b, and the overhead
    assert 2 * profile.entries["a"]["w8a8"] + profile.entries["b"]["w8a8"] + profile.overhead["quantized"] == 2.0
