"""The ``kling-async`` command as a separate process: Ctrl-C, pipes and resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: What the ``kling-async`` script does, saying on stderr when `main` is about to run:
#: the interrupts are timed from there (the command's own start-up: click, rich, the
#: commands, asyncio, the simulator). Before that, Python is still importing the package
#: root, which no code of the command line can guard.
_SCRIPT = (
    "import sys\n"
    "from kling_async._cli import main\n"
    "sys.stderr.write('main\\n'); sys.stderr.flush()\n"
    "main(sys.argv[1:])\n"
)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "100"
    return env


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.05, 0.1, 0.3])
def test_ctrl_c_while_starting_prints_one_line_and_exits_130(delay: float, tmp_path: Path) -> None:
    command = [sys.executable, "-c", _SCRIPT]
    command += ["batch", str(EXAMPLES / "batch.jsonl"), "--simulate"]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    assert process.stderr.readline() == b"main\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    text = err.decode()
    assert process.returncode == 130, text
    assert "Traceback" not in text
    assert text.rstrip().splitlines()[-1] == "interrupted"
    assert out == b"" or all(line.startswith(b"{") for line in out.splitlines())
