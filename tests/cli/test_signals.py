"""Signals while the CLI loads: acted on once torch and numpy have loaded, never an import traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest

from qcompile.cli import Terminated, _signals_deferred


def test_the_cli_module_loads_without_torch():
    code = "import sys, qcompile.cli; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_during_the_imports_is_raised_after_them(sig, raised):
    finished = []
    with pytest.raises(raised):
        with _signals_deferred():
            os.kill(os.getpid(), sig)
            finished.append(True)  # the block is not interrupted
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_an_interrupt_while_torch_loads_is_one_line_and_status_130(tmp_path):
    """SIGINT once the process maps torch's libraries, in the middle of ``import torch``: one line and status 130
    (before the deferral, a KeyboardInterrupt traceback, or numpy's ImportError with status 1)."""
    model = tmp_path / "m.py"
    model.write_text("import torch\n\ndef build_model():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    proc = subprocess.Popen([sys.executable, "-m", "qcompile", str(model), "--out", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while "torch" not in open(f"/proc/{proc.pid}/maps").read() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.strip()) == (130, "qcompile: interrupted")
