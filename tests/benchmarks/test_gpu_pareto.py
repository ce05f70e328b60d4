"""benchmarks/gpu_pareto.py rehearsed on the CPU at --smoke size, so the GPU run never fails on a bug: train
every kind of run in worker processes, stop one at the deadline and resume it from the packed output, then
finish on the CPU (lower, verify against the reference, tables, plots, the retrained checkpoint)."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_pareto.py"
SAMPLE = ROOT / "examples" / "data" / "cifar10-sample.tar.gz"


def gpu_pareto(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--data", str(SAMPLE), "--work", str(cwd / "work")],
                          capture_output=True, text=True, timeout=240, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_smoke_run_packs_resumes_and_finishes(tmp_path):
    first, second, results = tmp_path / "first", tmp_path / "second", tmp_path / "results"
    gpu_pareto("run", str(first), "--smoke", "--workers", "2", "--budget-s", "0", cwd=tmp_path)
    started = json.loads((first / "summary.json").read_text())
    assert not started["runs"] and len(started["not_started"]) == 6  # no time: nothing started, all listed

    gpu_pareto("run", str(second), "--smoke", "--workers", "2", "--resume", str(first), cwd=tmp_path)
    summary = json.loads((second / "summary.json").read_text())
    assert {r["status"] for r in summary["runs"].values()} == {"done"} and len(summary["runs"]) == 6
    assert summary["aggregate_images_per_second"] > 0 and not summary["not_started"]
    packed = [m.name for p in second.glob("pack-*.tar") for m in tarfile.open(p).getmembers()]
    assert "float/resnet20_cifar.pt" in packed and "sweep/runs/w0.5-mostly4bit/checkpoint.pt" in packed
    assert len(list(second.iterdir())) <= 8

    log = gpu_pareto("finish", str(second), "--results", str(results), "--profile", "", cwd=tmp_path)
    assert "checkpoint: top-1" in log and "QAT mostly4bit" in log
    report = json.loads((results / "summary.json").read_text())
    assert report["sweep_rows"] == 4 and not report["missing_pairs"]
    rows = json.loads((results / "sweep.json").read_text())["rows"]
    quantized = [r for r in rows if r["recipe"] != "bf16"]
    assert quantized and all(r["reference_images"] == 32 and r["reference_agreement"] == 1.0 for r in quantized)
    assert report["qat"]["mostly4bit"]["reference_agreement"] == 1.0
    assert (results / "top1_vs_linear.png").stat().st_size > 0 and (results / "resnet20_cifar.pt").exists()

    again = gpu_pareto("finish", str(second), "--results", str(results), "--profile", "", cwd=tmp_path)
    assert "top-1" not in again  # everything is in the results already: nothing is lowered or evaluated twice
    assert json.loads((results / "summary.json").read_text())["sweep_rows"] == 4

    later = tmp_path / "later"  # a later GPU run skips the pairs the table holds
    gpu_pareto("run", str(later), "--smoke", "--budget-s", "0", "--table", str(results / "runs.json"), cwd=tmp_path)
    skipped = json.loads((later / "summary.json").read_text())
    assert len(skipped["in_table"]) == 4 and len(skipped["not_started"]) == 2


def test_rows_merge_across_finishes(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_pareto

    expected = {"epochs": 30, "train_images": 50_000}
    table = tmp_path / "runs.json"
    table.write_text(json.dumps([{"width": 2.0, "recipe": "int8", **expected, "top1": 0.8},
                                 {"width": 1.0, "recipe": "bf16", **expected, "top1": 0.7},
                                 {"width": 0.5, "recipe": "bf16", "epochs": 2, "train_images": 50_000}]))
    rows = gpu_pareto.merge_rows([{"width": 1.0, "recipe": "bf16", **expected, "top1": 0.75}], table, expected)
    assert [(r["width"], r["recipe"], r["top1"]) for r in rows] == [(1.0, "bf16", 0.75), (2.0, "int8", 0.8)]


def test_profile_times_a_step_in_both_phases(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "profile", str(tmp_path), "--pairs", "w0.5-mostly4bit",
                           "--batch", "8", "--steps", "3", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "steps.json").read_text())["rows"]
    assert [r["phase"] for r in rows] == ["observing", "frozen"] and all(r["ms_per_step"] > 0 for r in rows)
    assert any("aten::" in line for line in rows[1]["kernels"])  # the profiler's table of what ran
