"""benchmarks/tvm_gpu.py, tvm_tune.py, qcompile profile --stage and tvm_gpu_session.sh rehearsed on the CPU
(ResNet-20, a CPU target), so the GPU call never fails on a bug: build the artifacts, the check images, the tuning
candidates and a staged latency profile, pack them with a runtime-only TVM, unpack and run them through the
session script with that TVM alone, commit the times."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from qcompile.backends.tvm.targets import host_cpu_target  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tvm_gpu.py"
TUNE = ROOT / "benchmarks" / "tvm_tune.py"
SAMPLE = ROOT / "examples" / "data" / "cifar10-sample.tar.gz"
CPU = host_cpu_target()


def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # 100 s on a 2-core AVX2 machine: run with -m slow before a device session, as every session ends
def test_build_pack_and_session_rehearsal(tmp_path):
    bench, tune, stage = tmp_path / "bench", tmp_path / "tune", tmp_path / "stage"
    bundle, out = tmp_path / "bundle.tar.gz", tmp_path / "out"
    _run(sys.executable, str(SCRIPT), "build", "--out", str(bench), "--model", "resnet20", "--target", CPU,
         "--recipes", "mostly4bit", "--batches", "2,1", "--check-images", "12", "--data", str(SAMPLE))
    log = _run(sys.executable, str(TUNE), "candidates", "--out", str(tune), "--model", "resnet20", "--target", CPU,
               "--recipes", "mostly4bit", "--batches", "2")
    assert "GEMM shapes" in log
    _run(sys.executable, "-m", "qcompile", "profile", "examples/resnet20_cifar.py", "--backend", "tvm", "--target",
         CPU, "--bits", "8", "--stage", str(stage), "--out", str(tmp_path / "unused.json"))
    log = _run(sys.executable, str(SCRIPT), "pack", "--out", str(bench), "--bundle", str(bundle), "--tuning",
               str(tune), "--profile-stage", str(stage))
    assert "MiB" in log
    members = {m.name: m for m in tarfile.open(bundle).getmembers()}
    params = [members[f"bench/mostly4bit/b{b}/tvm/{CPU}/params.npz"] for b in (1, 2)]
    assert sorted(p.islnk() for p in params) == [False, True]  # the batches' shared params travel once
    assert not [n for n in members if n.endswith("libtvm_compiler.so") or "/3rdparty/" in n]

    out.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # python3 is this python
           "TVM_GPU_WORK": str(tmp_path / "work"), "TVM_GPU_ARGS": "--device cpu --repeat 2",
           "TVM_TUNE_ARGS": "--device cpu", "TVM_PROFILE_ARGS": "--rounds 2"}
    log = _run("bash", "benchmarks/tvm_gpu_session.sh", str(out), str(bundle), "--profile", env=env)
    assert f"{tmp_path / 'work' / 'tvm-runtime'}" in log  # the bundle's runtime-only TVM, not the installed one
    report = json.loads((out / "tvm_gpu.json").read_text())
    assert set(report["agreement"]) == {"mostly4bit/b2", "mostly4bit/b1"}
    for agreement in report["agreement"].values():
        assert agreement == {"images": 12, "top1_agreement": 1.0, "identical_fraction": 1.0, "max_lsb_diff": 0}
    assert {r["contender"] for r in report["rows"]} == {"TVM mostly4bit", "torch float32 eager"}
    assert not report["errors"]
    assert report["profile"]["mostly4bit/b2"] and (out / "console.txt").is_file()

    measured = json.loads((out / "tuning.json").read_text())
    manifest = json.loads((tune / "manifest.json").read_text())
    assert set(measured["ms"]) == {c["name"] for c in manifest["candidates"]} and min(measured["ms"].values()) > 0
    profile = json.loads((out / "profile-tvm.json").read_text())
    assert profile["backend"] == f"tvm ({CPU})" and profile["layers_ms"]
    table = tmp_path / "table.json"
    log = _run(sys.executable, str(TUNE), "commit", "--out", str(tune), "--measured", str(out / "tuning.json"),
               "--device", "cpu", "--table", str(table))
    assert set(json.loads(table.read_text())["shapes"]) == set(manifest["tasks"]) and "one forward pass" in log
