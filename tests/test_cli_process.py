"""The ``kling-async`` command as a separate process: Ctrl-C, pipes and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: What the ``kling-async`` script does, saying on stderr once `main` runs (from inside
#: its guard, so that a busy machine cannot land the interrupt between the line and the
#: call): the interrupts are timed from there (the command's own start-up: click, rich,
#: the commands, asyncio, the simulator). Before `main`, Python is still importing the
#: package root, which no code of the command line can guard.
_SCRIPT = (
    "import sys\n"
    "from kling_async import _cli\n"
    "run = _cli._run\n"
    "def started(*args):\n"
    "    sys.stderr.write('main\\n'); sys.stderr.flush()\n"
    "    run(*args)\n"
    "_cli._run = started\n"
    "_cli.main(sys.argv[1:])\n"
)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "100"
    return env


@pytest.mark.parametrize("delay", [0.005, 0.02, 0.05, 0.1, 0.3])
def test_ctrl_c_while_starting_prints_one_line_and_exits_130(delay: float, tmp_path: Path) -> None:
    command = [sys.executable, "-c", _SCRIPT]
    command += ["batch", str(EXAMPLES / "batch.jsonl"), "--simulate", "--no-journal"]
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


def _rows(count: int) -> str:
    return "".join(f'{{"video_id": "v{n}", "prompt": "scene {n}"}}\n' for n in range(1, count + 1))


def _created(state: Path) -> list[str]:
    """The external task ids of every task the simulator's state file remembers."""
    if not state.exists():
        return []
    tasks = json.loads(state.read_text(encoding="utf-8"))["store"]["tasks"]
    return [task["external_task_id"] for task in tasks]


def test_ctrl_c_and_the_same_command_again_finish_every_row_once(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text(_rows(12), encoding="utf-8")
    journal = tmp_path / "rows.journal"
    state = tmp_path / "rows.journal.sim-state.json"
    command = [sys.executable, "-m", "kling_async", "batch", str(source), "--simulate"]
    command += ["--journal", str(journal), "--concurrency", "4", "--json"]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while len(_created(state)) < 3:  # a few rows submitted (tasks take about 3 s each)
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    finished_first = [json.loads(line) for line in out.splitlines()]
    assert len(finished_first) < 12
    again = subprocess.run(
        command, cwd=tmp_path, env=_environment(), capture_output=True, timeout=120, check=False
    )
    assert again.returncode == 0, again.stderr.decode()
    results = [json.loads(line) for line in again.stdout.splitlines()]
    assert sorted(result["row"] for result in results) == list(range(1, 13))
    assert all(result["ok"] for result in results), again.stdout.decode()
    created = _created(state)
    assert len(created) == 12
    assert len(set(created)) == 12  # no external task id was created twice
    submitted_before = {r["task"]["task_id"] for r in finished_first}
    assert submitted_before <= {r["task"]["task_id"] for r in results}
