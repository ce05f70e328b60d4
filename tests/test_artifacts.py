"""Atomic writes and the output transaction: ``--out`` holds exactly one complete run, whatever kills a run.

The transaction is tested on its own (success, failure, crashes between its renames in a child process, dead
runs' leftovers, interrupts as a file or folder is being created), then end to end: the CLI killed at random
points of its runs, alternating SIGINT and SIGKILL and two recipes, must leave ``--out`` holding one complete run.
"""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcompile.artifacts import (
    STALE_AFTER_S,
    atomic_path,
    default_mode,
    keep_failed,
    output_transaction,
    write_json,
    write_text,
)
from qcompile.errors import OutputDirError, QCompileError
from tests.test_ptq_cli import TINY

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its contents."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    """What else than ``out`` its parent holds: staging, backup and failed folders."""
    return sorted(p.name for p in out.parent.iterdir() if p != out)


@pytest.fixture
def out(tmp_path):
    """A previous run in its own parent folder."""
    folder = tmp_path / "runs" / "out"
    (folder / "ir").mkdir(parents=True)
    (folder / "report.json").write_text("old report")
    (folder / "ir" / "graph.json").write_text("old ir")
    (folder / "model.compact.onnx").write_text("old compact")
    return folder


def test_success_swaps_the_folder_whole(out):
    with output_transaction(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(f"out.qcompile-staging-{os.getpid()}-")
        assert tree(out)["report.json"] == b"old report"  # the previous run stays until the swap
        (staging / "ir").mkdir()
        (staging / "ir" / "graph.json").write_text("new ir")
        write_json(staging / "report.json", {"recipe": "int8"})
    assert tree(out) == {"ir/graph.json": b"new ir", "report.json": b'{\n  "recipe": "int8"\n}\n'}
    assert siblings(out) == []
    assert out.stat().st_mode & 0o777 == default_mode(directory=True)


def test_failure_leaves_the_previous_run_and_no_staging(out):
    before = tree(out)
    with pytest.raises(ValueError, match="boom"):
        with output_transaction(out) as staging:
            (staging / "report.json").write_text("half a run")
            raise ValueError("boom")
    assert tree(out) == before and siblings(out) == []


FULL = os.strerror(errno.ENOSPC)


@pytest.mark.parametrize("raised, line", [
    (lambda staging: OSError(errno.ENOSPC, FULL), f"cannot write out {{out}}: {FULL}"),  # a zip member's close
    (lambda staging: OSError(errno.ENOSPC, FULL, str(staging / "ir" / "tensors.npz")),
     f"cannot write out {{out}}: {FULL} (writing ir/tensors.npz)"),
    (lambda staging: OSError(errno.EROFS, os.strerror(errno.EROFS), str(staging / "report.json")),
     f"cannot write out {{out}}: {os.strerror(errno.EROFS)} (writing report.json)"),
    (lambda staging: OSError(errno.EACCES, os.strerror(errno.EACCES), str(staging / "tvm")),
     f"cannot write out {{out}}: {os.strerror(errno.EACCES)} (writing tvm)"),
])
def test_a_full_or_read_only_disk_is_one_error_naming_the_folder(raised, line, out):
    """The storage's failures while the run's folder is written: an OutputDirError, the previous run kept."""
    before = tree(out)
    with pytest.raises(OutputDirError) as caught:
        with output_transaction(out) as staging:
            (staging / "ir").mkdir()
            raise raised(staging)
    assert caught.value.naming("out") == line.format(out=out)
    assert tree(out) == before and siblings(out) == []


@pytest.mark.parametrize("raised", [OSError(errno.EACCES, "Permission denied", "/etc/shadow"),
                                    OSError(errno.ENOENT, "No such file or directory", None)])
def test_other_os_errors_in_the_block_are_not_the_output_folders(raised, out):
    """Reading a file the run may not read, or a missing one, is not a write into --out."""
    with pytest.raises(OSError) as caught:
        with output_transaction(out):
            raise raised
    assert caught.value is raised and siblings(out) == []


def test_a_failed_write_names_the_file_not_its_temporary_name(tmp_path, monkeypatch):
    """A write into a full disk names no file; atomic_path names the file it was writing."""
    def full(self, data):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            tmp.write_bytes(b"x")
    assert caught.value.filename == str(tmp_path / "checkpoint.pt") and list(tmp_path.iterdir()) == []


def test_the_staging_folder_that_cannot_be_made_is_one_error(out, monkeypatch):
    real_mkdir = os.mkdir

    def refused(path, mode=0o777, **kw):
        if "qcompile-staging" not in str(path):
            return real_mkdir(path, mode, **kw)
        raise OSError(errno.ENOENT, "No such file or directory", path)  # as in /proc

    monkeypatch.setattr(os, "mkdir", refused)
    with pytest.raises(OutputDirError, match="cannot create a folder beside it: No such file or directory"):
        with output_transaction(out):
            pytest.fail("the block must not run")


def test_first_run_creates_the_folder_and_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_transaction(out) as staging:
        (staging / "report.json").write_text("{}")
    assert tree(out) == {"report.json": b"{}"} and siblings(out) == []


@pytest.mark.parametrize("content", ["notes.txt", "ir/graph.json"])
def test_a_folder_without_a_report_is_never_replaced(content, tmp_path):
    folder = tmp_path / "mine"
    (folder / content).parent.mkdir(parents=True, exist_ok=True)
    (folder / content).write_text("the user's")
    with pytest.raises(QCompileError, match="without report.json"):
        with output_transaction(folder):
            pytest.fail("the transaction must not start")
    assert tree(folder) == {content: b"the user's"}


CRASH = """
import os, sys
from pathlib import Path
from qcompile.artifacts import output_transaction

renames, rename = [], os.rename
def dying_rename(src, dst):
    rename(src, dst)
    renames.append(dst)
    if len(renames) == int(sys.argv[2]):
        os._exit(9)  # the process dies here: no handler, no finally
os.rename = dying_rename
with output_transaction(Path(sys.argv[1])) as staging:
    (staging / "report.json").write_text("new report")
"""


def crash_in_swap(out: Path, after_renames: int) -> None:
    """Run a transaction in a child process that dies right after its ``after_renames``-th rename."""
    proc = subprocess.run([sys.executable, "-c", CRASH, str(out), str(after_renames)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


def test_crash_between_the_renames_is_recovered(out):
    before = tree(out)
    crash_in_swap(out, after_renames=1)  # the previous run renamed aside, the new one not yet in place
    assert not out.exists() and [n.split("-")[1] for n in siblings(out)] == ["backup", "staging"]
    with pytest.raises(RuntimeError):
        with output_transaction(out):
            assert tree(out) == before  # restored before the run starts
            raise RuntimeError
    assert tree(out) == before and siblings(out) == []


def test_crash_after_the_swap_keeps_the_new_run(out):
    crash_in_swap(out, after_renames=2)  # the new run in place, the previous one not yet deleted
    assert tree(out) == {"report.json": b"new report"} and len(siblings(out)) == 1
    with output_transaction(out) as staging:
        (staging / "report.json").write_text("newest")
    assert tree(out) == {"report.json": b"newest"} and siblings(out) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_and_old_runs_leftovers_are_removed(out):
    dead, alive = dead_pid(), os.getppid()
    parent = out.parent
    for name in (f"out.qcompile-staging-{dead}-0a1b2c3d", f"out.qcompile-backup-{dead}-0a1b2c3d",
                 f"out.qcompile-staging-{alive}-00000000", f"out.qcompile-staging-{alive}-11111111",
                 f"other.qcompile-staging-{dead}-0a1b2c3d", "out.notes"):
        (parent / name).mkdir()
        (parent / name / "model.onnx").write_text("x")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(parent / f"out.qcompile-staging-{alive}-11111111", (old, old))  # pid since reused
    with output_transaction(out) as staging:
        (staging / "report.json").write_text("new")
    assert siblings(out) == [f"other.qcompile-staging-{dead}-0a1b2c3d", "out.notes",
                             f"out.qcompile-staging-{alive}-00000000"]  # alive, or not out's


def test_interrupt_while_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The signal lands after the file exists but before its creator returns (once between mkstemp and the
    ``try``): the name was chosen before, so it is removed."""
    real_open = os.open

    def interrupted(path, flags, mode=0o777, **kw):
        os.close(real_open(path, flags, mode, **kw))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text(tmp_path / "report.json", "x")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_the_staging_folder_is_created_leaves_nothing(out, monkeypatch):
    real_mkdir = os.mkdir

    def interrupted(path, mode=0o777, **kw):
        real_mkdir(path, mode, **kw)
        raise KeyboardInterrupt

    before = tree(out)
    monkeypatch.setattr(os, "mkdir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with output_transaction(out):
            pytest.fail("the block must not run")
    assert tree(out) == before and siblings(out) == []


def test_atomic_write_keeps_the_umask_mode(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == default_mode()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_run_finished_meanwhile_by_another_process_is_kept(out, monkeypatch):
    """Another run's swap lands between this one's two renames: its run stays in out, this one is dropped."""
    real_rename = os.rename

    def racing(src, dst):
        real_rename(src, dst)
        if Path(src) == out:  # the other run's rename of its staging folder onto out
            out.mkdir()
            (out / "report.json").write_text("other run")
            monkeypatch.setattr(os, "rename", real_rename)

    monkeypatch.setattr(os, "rename", racing)
    with pytest.raises(QCompileError, match="another run wrote"):
        with output_transaction(out) as staging:
            (staging / "report.json").write_text("this run")
    assert tree(out) == {"report.json": b"other run"} and siblings(out) == []


def test_a_failed_run_kept_aside_until_a_run_succeeds(out):
    before = tree(out)
    with pytest.raises(QCompileError):
        with output_transaction(out) as staging:
            (staging / "report.json").write_text("failed verification")
            keep_failed(staging, out)
            raise QCompileError("artifact disagrees")
    assert tree(out) == before and siblings(out) == ["out.qcompile-failed"]
    assert tree(out.parent / "out.qcompile-failed") == {"report.json": b"failed verification"}
    with output_transaction(out) as staging:
        (staging / "report.json").write_text("good")
    assert tree(out) == {"report.json": b"good"} and siblings(out) == []


# ---- fault injection: the CLI killed at random points ----

COMPLETE_RUN = {"report.json", "report.html", "ir/graph.json", "ir/tensors.npz", "model.onnx", "model.compact.onnx"}
RECIPES = ("int8", "mostly4bit")


def start(model: Path, out: Path, recipe: str) -> subprocess.Popen:
    """``qcompile`` on the tiny model: a few seconds, two ONNX artifacts verified on 16 images."""
    env = dict(os.environ, QCOMPILE_CACHE=str(out.parent.parent / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qcompile", str(model), "--recipe", recipe, "--out", str(out), "--quiet",
           "--verify-size", "16", "--calib-size", "32", "--backend", "onnx"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_one_complete_run(out: Path) -> dict:
    """``out`` holds the files of a complete run, each the one its report describes, and the IR is of the
    report's recipe."""
    report = json.loads((out / "report.json").read_text())
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == COMPLETE_RUN
    assert set(report["files"]) == COMPLETE_RUN - {"report.json"}
    for rel, recorded in report["files"].items():
        data = (out / rel).read_bytes()
        assert recorded == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert json.loads((out / "ir" / "graph.json").read_text())["metadata"]["recipe"] == report["recipe"]
    assert report["artifacts"] == {"ir": str(out / "ir"), "onnx_serving": str(out / "model.onnx"),
                                   "onnx_compact": str(out / "model.compact.onnx")}
    return report


def complete_run(model: Path, out: Path, recipe: str) -> float:
    """Run to completion; the seconds it took."""
    began = time.perf_counter()
    proc = start(model, out, recipe)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert assert_one_complete_run(out)["recipe"] == recipe
    return time.perf_counter() - began


@pytest.mark.parametrize("kills", [5, pytest.param(50, marks=pytest.mark.slow)])
def test_killed_runs_never_leave_a_mixed_folder(kills, tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    out = tmp_path / "runs" / "out"
    complete_run(model, out, RECIPES[0])  # the first run is slower: it fills the OS's and Python's caches
    duration = complete_run(model, out, RECIPES[1])
    rng = random.Random(kills)
    # one kill in each of `kills` equal slices of the run, in random order: uniform, and spread over the run
    delays = [duration * (k + rng.random()) / kills for k in rng.sample(range(kills), kills)]
    outcomes = []
    for i, delay in enumerate(delays):
        recipe, sig = RECIPES[i % 2], (signal.SIGINT, signal.SIGKILL)[i // 2 % 2]
        previous = (out / "report.json").read_bytes()
        proc = start(model, out, recipe)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate()
        # an exit of its own is never a traceback; one by the signal may be (SIGINT while Python starts up)
        assert "Traceback" not in err or proc.returncode < 0, err
        report = assert_one_complete_run(out)
        replaced = (out / "report.json").read_bytes() != previous
        assert not replaced or report["recipe"] == recipe
        outcomes.append((sig.name, round(delay, 2), proc.returncode, "new run" if replaced else "previous run"))
    print("\n".join(map(str, outcomes)))
    complete_run(model, out, RECIPES[kills % 2])
    assert siblings(out) == []
    assert "qcompile-staging" not in (out / "report.json").read_text() + (out / "ir" / "graph.json").read_text()
