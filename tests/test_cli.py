"""The ``kling-async`` command line, run with click's `CliRunner` against the simulator."""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from kling_async._cli import _progress as _cli_progress
from kling_async._cli._app import cli
from kling_async._cli._options import expand_bare_simulate
from kling_async.testing import SimPack, Simulator

pytest_plugins = ["kling_async.testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: The key the simulator accepts in these tests: no output may ever show it.
SECRET = f"sk-test-{uuid.uuid4().hex}"
FAST = ("--poll-interval", "0.02")
VIDEO = "828006748715380777"
CREDENTIALS = ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def simulator(**options: Any) -> pytest.MarkDecorator:
    """The `kling_simulator` marker: fast tasks and the secret key, plus `options`."""
    settings: dict[str, Any] = {"api_key": SECRET, "submit_time": 0.02, "processing_time": 0.1}
    marker: pytest.MarkDecorator = pytest.mark.kling_simulator(**{**settings, **options})
    return marker


pytestmark = simulator()

Invoke = Callable[..., Result]


def _runner() -> CliRunner:
    # click 8.1 mixes stderr into stdout unless told not to; 8.2 dropped the argument.
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        old_style: dict[str, Any] = {"mix_stderr": False}
        return CliRunner(**old_style)  # pragma: no cover - click < 8.2
    return CliRunner()


@pytest.fixture
def invoke() -> Iterator[Invoke]:
    """Run the CLI in-process; every run's stdout and stderr are checked for the key."""
    runner = _runner()
    results: list[Result] = []

    def run(*args: str | os.PathLike[str], input: str | None = None) -> Result:
        result = runner.invoke(cli, [os.fspath(a) for a in args], input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        results.append(result)
        return result

    yield run
    for result in results:
        assert SECRET not in result.stdout
        assert SECRET not in result.stderr


@pytest.fixture(autouse=True)
def examples(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of examples/ per test: a batch keeps its journal beside its input."""
    import shutil

    copy = tmp_path_factory.mktemp("examples") / "examples"
    shutil.copytree(ROOT / "examples", copy)
    monkeypatch.setattr(sys.modules[__name__], "EXAMPLES", copy)
    return copy


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Kling settings in the environment at all."""
    for name in (*CREDENTIALS, "KLING_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_row(text: str) -> dict[int, dict[str, Any]]:
    results = lines(text)
    rows = {result["row"]: result for result in results}
    assert len(rows) == len(results), "one line per row"
    return rows


def check_sample_results(rows: dict[int, dict[str, Any]]) -> None:
    """The shipped samples: 8 rows, row 5 bad (cfg_scale 1.5), the rest succeeded."""
    assert sorted(rows) == list(range(1, 9))
    bad = rows.pop(5)
    assert bad["ok"] is False
    assert bad["task"] is None
    assert bad["error"]["field"] == "cfg_scale"
    assert bad["error"]["message"] == "row 5: cfg_scale: must be a number from 0 to 1 (given: 1.5)"
    for result in rows.values():
        assert result["ok"] is True, result
        assert result["error"] is None
        assert result["task"]["task_status"] == "succeed"
        assert result["task"]["task_result"]["videos"][0]["url"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- the command group ---------------------------------------------------------------------


def test_help_lists_every_command(invoke: Invoke) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("extend", "status", "wait", "list", "batch", "download", "simulate"):
        assert f"  {command} " in result.stdout
        assert invoke(command, "--help").exit_code == 0
    assert "Examples:" in result.stdout


def test_version(invoke: Invoke) -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("kling-async, version ")


def test_python_m_kling_async_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kling_async", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: python -m kling_async" in done.stdout
    assert "batch" in done.stdout


def test_bare_simulate_never_swallows_the_next_argument() -> None:
    assert expand_bare_simulate(["batch", "--simulate", "in.csv"]) == [
        "batch",
        "--simulate=always",
        "in.csv",
    ]
    assert expand_bare_simulate(["--simulate", "auto", "x"]) == ["--simulate", "auto", "x"]
    assert expand_bare_simulate(["x", "--simulate"]) == ["x", "--simulate=always"]
    assert expand_bare_simulate(["--", "--simulate"]) == ["--", "--simulate"]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("extend", VIDEO, "a prompt"),
        ("status", "123"),
        ("wait", "123"),
        ("list",),
        ("download", "123", "out.mp4"),
        ("batch", str(EXAMPLES / "with-bad-row.jsonl")),
    ],
    ids=lambda command: command[0],
)
def test_missing_credentials_exit_2_naming_the_variables(
    invoke: Invoke, no_env: None, command: tuple[str, ...]
) -> None:
    result = invoke(*command, "--simulate=never")
    assert result.exit_code == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message
    assert "Traceback" not in message
    for name in CREDENTIALS:
        assert name in message


def test_a_wrong_key_is_a_configuration_error_and_never_printed(
    invoke: Invoke, kling_env: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("KLING_API_KEY", wrong)
    result = invoke("status", "123")
    assert result.exit_code == 2
    assert "KLING_API_KEY" in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_base_url_and_simulate_do_not_mix(invoke: Invoke) -> None:
    result = invoke("list", "--simulate", "--base-url", "https://example.com")
    assert result.exit_code == 2
    assert "--base-url" in result.stderr


def test_simulate_auto_uses_the_api_when_credentials_are_set(
    invoke: Invoke, kling_env: Simulator
) -> None:
    result = invoke("extend", VIDEO, "the tide rises", "--simulate=auto", "--json")
    assert result.exit_code == 0, result.stderr
    assert "credentials found" in result.stderr
    assert kling_env.base_url in result.stderr
    assert kling_env.counters.tasks_created == 1


def test_simulate_auto_without_credentials_uses_the_simulator(invoke: Invoke, no_env: None) -> None:
    result = invoke("list", "--simulate=auto", "--json")
    assert result.exit_code == 0, result.stderr
    assert "built-in simulator" in result.stderr
    assert result.stdout == ""


def test_bare_simulate_runs_a_batch_with_no_environment(
    invoke: Invoke, no_env: None, tmp_path: Path
) -> None:
    result = invoke(
        "batch",
        "--simulate",
        EXAMPLES / "with-bad-row.jsonl",
        "--download",
        tmp_path,
        "--poll-interval",
        "0.1",
    )
    assert result.exit_code == 1, result.stderr
    assert "built-in simulator" in result.stderr
    rows = by_row(result.stdout)
    check_sample_results(rows)
    assert all(Path(r["file"]).is_file() for r in rows.values())


# -- single-task commands --------------------------------------------------------------------


def test_extend_json(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke(
        "extend",
        VIDEO,
        "延长动画效果",
        "--cfg-scale",
        "0.5",
        "--negative-prompt",
        "blur",
        "--external-task-id",
        "my-id-1",
        "--no-watermark",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    (task,) = lines(result.stdout)
    assert task["task_status"] == "submitted"
    assert task["task_info"]["external_task_id"] == "my-id-1"
    sent = kling_env.tasks[task["task_id"]].request
    assert sent["prompt"] == "延长动画效果"
    assert sent["cfg_scale"] == 0.5
    assert sent["negative_prompt"] == "blur"
    assert sent["watermark_info"] == {"enabled": False}
    assert kling_env.counters.tasks_created == 1


def test_extend_text_says_how_to_wait(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("extend", VIDEO, "the tide rises")
    assert result.exit_code == 0, result.stderr
    (task_id,) = kling_env.tasks
    assert f"task {task_id}: submitted" in result.stdout
    assert f"kling-async wait {task_id}" in result.stderr


def test_extend_wait_prints_the_finished_task(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("extend", VIDEO, "the tide rises", "--wait", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    (task,) = lines(result.stdout)
    assert task["task_status"] == "succeed"
    assert "succeed" in result.stderr  # status changes, as plain lines off a terminal


def test_extend_rejects_a_bad_cfg_scale_without_sending(
    invoke: Invoke, kling_env: Simulator
) -> None:
    result = invoke("extend", VIDEO, "the tide rises", "--cfg-scale", "1.5")
    assert result.exit_code == 2
    assert "--cfg-scale" in result.stderr
    bad_id = invoke("extend", "has space", "the tide rises")
    assert bad_id.exit_code == 2
    assert "video_id" in bad_id.stderr
    assert kling_env.counters.creates == 0


@simulator(failure_rate=1.0)
def test_extend_wait_exits_1_when_the_task_fails(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("extend", VIDEO, "the tide rises", "--wait", "--json", *FAST)
    assert result.exit_code == 1
    (task,) = lines(result.stdout)
    assert task["task_status"] == "failed"
    assert "failed" in result.stderr


def created(invoke: Invoke, *, wait: bool = True, external: str | None = None) -> dict[str, Any]:
    args = ["extend", VIDEO, "the tide rises", "--json", *FAST]
    if wait:
        args.append("--wait")
    if external is not None:
        args += ["--external-task-id", external]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    (task,) = lines(result.stdout)
    return task


def test_status(invoke: Invoke, kling_env: Simulator) -> None:
    task = created(invoke, external="order-42")
    by_id = invoke("status", task["task_id"], "--json")
    assert by_id.exit_code == 0, by_id.stderr
    assert lines(by_id.stdout)[0]["task_id"] == task["task_id"]
    by_external = invoke("status", "order-42", "--external", "--json")
    assert lines(by_external.stdout)[0]["task_id"] == task["task_id"]
    text = invoke("status", task["task_id"])
    assert text.exit_code == 0
    video = task["task_result"]["videos"][0]
    assert f"task {task['task_id']}: succeed" in text.stdout
    assert video["url"] in text.stdout
    assert "external_task_id: order-42" in text.stdout


def test_status_of_an_unknown_task_exits_1(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("status", "999999999999999999")
    assert result.exit_code == 1
    assert "999999999999999999" in result.stderr
    assert "Traceback" not in result.stderr


def test_wait(invoke: Invoke, kling_env: Simulator) -> None:
    task = created(invoke, wait=False)
    result = invoke("wait", task["task_id"], "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout)[0]["task_status"] == "succeed"
    text = invoke("wait", task["task_id"], *FAST)
    assert f"task {task['task_id']}: succeed" in text.stdout


@simulator(processing_time=30)
def test_wait_timeout_exits_1(invoke: Invoke, kling_env: Simulator) -> None:
    task = created(invoke, wait=False)
    result = invoke("wait", task["task_id"], "--timeout", "0.1", "--json", *FAST)
    assert result.exit_code == 1
    assert lines(result.stdout)[0]["task_id"] == task["task_id"]
    assert "after 0.1 s" in result.stderr


def test_list(invoke: Invoke, kling_env: Simulator) -> None:
    ids = {created(invoke, wait=False)["task_id"] for _ in range(3)}
    page = invoke("list", "--json", "--page-size", "2")
    assert page.exit_code == 0, page.stderr
    assert len(lines(page.stdout)) == 2
    every = invoke("list", "--all", "--json", "--page-size", "2")
    assert {task["task_id"] for task in lines(every.stdout)} == ids
    table = invoke("list", "--all", "--page-size", "2")
    assert table.exit_code == 0
    assert all(task_id in table.stdout for task_id in ids)
    second_page = invoke("list", "--page", "2", "--page-size", "2")
    assert sum(task_id in second_page.stdout for task_id in ids) == 1


def test_list_of_no_tasks(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("list")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no tasks" in result.stderr


def test_download(invoke: Invoke, kling_env: Simulator, tmp_path: Path) -> None:
    task = created(invoke)
    video = task["task_result"]["videos"][0]
    result = invoke("download", task["task_id"], tmp_path)
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / f"{video['id']}.mp4"
    assert path.read_bytes()[4:8] == b"ftyp"  # a real MP4
    again = invoke("download", task["task_id"], tmp_path)
    assert again.exit_code == 2
    assert "--overwrite" in again.stderr
    assert invoke("download", task["task_id"], tmp_path, "--overwrite").exit_code == 0
    named = invoke("download", task["task_id"], tmp_path / "mine.mp4")
    assert named.stdout.strip() == str(tmp_path / "mine.mp4")


@simulator(processing_time=30)
def test_download_of_an_unfinished_task_exits_1(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    task = created(invoke, wait=False)
    result = invoke("download", task["task_id"], tmp_path)
    assert result.exit_code == 1
    assert "kling-async wait" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- batch -----------------------------------------------------------------------------------


def test_batch_jsonl_with_a_bad_row(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("batch", EXAMPLES / "with-bad-row.jsonl", *FAST)
    assert result.exit_code == 1, result.stderr
    check_sample_results(by_row(result.stdout))
    assert kling_env.counters.tasks_created == 7
    assert not kling_env.counters.duplicate_external_ids
    assert "row 5: invalid: cfg_scale" in result.stderr
    assert "7 ok, 1 failed" in result.stderr


def test_batch_csv_with_a_bad_row(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("batch", EXAMPLES / "with-bad-row.csv", *FAST)
    assert result.exit_code == 1, result.stderr
    rows = by_row(result.stdout)
    assert rows[5]["error"]["message"] == (
        "row 5: cfg_scale: must be a number from 0 to 1 (given: 1.5)"
    )
    check_sample_results(rows)
    assert kling_env.counters.tasks_created == 7
    sent = {task.parent_video.id: task.request for task in kling_env.tasks.values()}
    first, dancer, chef = sent[VIDEO], sent["828006748715380780"], sent["828006748715380783"]
    assert first["cfg_scale"] == 0.5
    assert "negative_prompt" not in first  # an empty cell is "not given"
    assert "watermark_info" not in first
    assert dancer["watermark_info"] == {"enabled": False}
    assert chef["watermark_info"] == {"enabled": True}
    assert rows[3]["task"]["task_info"]["external_task_id"] == "cat-and-butterfly-001"


def test_batch_csv_bad_cells_name_row_and_field(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(
        tmp_path / "in.csv",
        "video_id,prompt,cfg_scale,watermark,negative_prompt\n"
        "v1,ok,0.5,yes,\n"
        "v2,bad number,high,,\n"
        "v3,bad flag,,maybe,\n"
        "v4,fine too,,,blur\n"
        ",no video,,,\n"
        "v6,too many cells,,,,extra\n"
        "\n"
        "v8,fine,1,0,\n",
    )
    result = invoke("batch", source, *FAST)
    assert result.exit_code == 1
    rows = by_row(result.stdout)
    assert rows[1]["ok"] is True
    assert rows[8]["ok"] is True
    expected = {
        2: ("cfg_scale", 'row 2: cfg_scale: must be a number from 0 to 1 (given: "high")'),
        3: ("watermark", 'row 3: watermark: must be true/false, 1/0 or yes/no (given: "maybe")'),
        5: ("video_id", "row 5: video_id: is required"),
        6: (None, "row 6: has 6 cells but the header names 5 columns"),
    }
    for row, (field, message) in expected.items():
        error = rows[row]["error"]
        assert error["field"] == field
        assert error["message"].startswith(message)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 8]  # row 7 is blank
    assert kling_env.counters.tasks_created == 3  # an unknown column: see the header test


def test_batch_jsonl_bad_lines_do_not_stop_the_batch(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(
        tmp_path / "in.jsonl",
        '{"video_id": "v1", "prompt": "one"}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"video_id": "v4", "prompt": "four", "cfg_scale": "0.5"}\n'
        '{"video_id": "v5", "prompt": "five", "negative_prompt": null, "Prompt": "x"}\n'
        '{"video_id": "v6", "prompt": "six", "watermark": true}\n',
    )
    result = invoke("batch", source, *FAST)
    assert result.exit_code == 1
    rows = by_row(result.stdout)
    assert rows[2]["error"]["message"].startswith("row 2: not valid JSON")
    assert rows[3]["error"]["message"] == "row 3: must be a JSON object, got an array"
    assert rows[4]["error"]["field"] == "cfg_scale"
    assert rows[5]["error"]["field"] == "Prompt"
    assert [rows[n]["ok"] for n in (1, 6)] == [True, True]
    assert kling_env.counters.tasks_created == 2


def test_batch_download(invoke: Invoke, kling_env: Simulator, tmp_path: Path) -> None:
    target = tmp_path / "videos" / "new"  # created when missing
    result = invoke("batch", EXAMPLES / "with-bad-row.jsonl", "--download", target, *FAST)
    assert result.exit_code == 1, result.stderr
    rows = by_row(result.stdout)
    assert rows[5]["file"] is None
    files = {Path(r["file"]) for n, r in rows.items() if n != 5}
    assert len(files) == 7
    for result_line in (r for n, r in rows.items() if n != 5):
        path = Path(result_line["file"])
        assert path.parent == target.resolve()
        row, video = result_line["row"], result_line["task"]["task_info"]["parent_video"]["id"]
        external = result_line["task"]["task_info"]["external_task_id"]
        assert path.name == (
            f"{row}-cat-and-butterfly-001.mp4" if row == 3 else f"{row}-{video}.mp4"
        )
        assert external
        assert path.read_bytes()[4:8] == b"ftyp"  # a real MP4
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in files)


def test_batch_journal_resume_creates_no_new_tasks(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "batch.journal"
    download = tmp_path / "videos"
    args = ("batch", EXAMPLES / "with-bad-row.jsonl", "--journal", journal, "--download", download)
    first = invoke(*args, *FAST)
    assert first.exit_code == 1, first.stderr
    assert kling_env.counters.tasks_created == 7
    again = invoke(*args, *FAST)
    assert again.exit_code == 1, again.stderr
    assert kling_env.counters.tasks_created == 7
    before, after = by_row(first.stdout), by_row(again.stdout)
    assert {n: r["task"] and r["task"]["task_id"] for n, r in after.items()} == {
        n: r["task"] and r["task"]["task_id"] for n, r in before.items()
    }
    assert {n: r["file"] for n, r in after.items()} == {n: r["file"] for n, r in before.items()}
    check_sample_results(after)


def test_batch_journal_of_another_input_is_a_usage_error(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "batch.journal"
    assert (
        invoke("batch", EXAMPLES / "with-bad-row.jsonl", "--journal", journal, *FAST).exit_code == 1
    )
    other = write(tmp_path / "other.jsonl", '{"video_id": "v9", "prompt": "another"}\n')
    result = invoke("batch", other, "--journal", journal, *FAST)
    assert result.exit_code == 2
    assert "journal" in result.stderr


def test_batch_from_stdin_to_a_file(invoke: Invoke, kling_env: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    text = (EXAMPLES / "with-bad-row.csv").read_text(encoding="utf-8")
    result = invoke("batch", "-", "--format", "csv", "--out", out, *FAST, input=text)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    check_sample_results(by_row(out.read_text(encoding="utf-8")))
    jsonl = (EXAMPLES / "with-bad-row.jsonl").read_text(encoding="utf-8")
    piped = invoke("batch", "-", *FAST, input=jsonl)  # stdin defaults to JSONL
    check_sample_results(by_row(piped.stdout))


def test_batch_no_wait(invoke: Invoke, kling_env: Simulator, tmp_path: Path) -> None:
    source = write(
        tmp_path / "in.jsonl",
        "".join(f'{{"video_id": "v{n}", "prompt": "p{n}"}}\n' for n in range(4)),
    )
    result = invoke("batch", source, "--no-wait", "--concurrency", "2")
    assert result.exit_code == 0, result.stderr
    rows = by_row(result.stdout)
    assert {r["task"]["task_status"] for r in rows.values()} == {"submitted"}
    assert kling_env.counters.tasks_created == 4


@simulator(processing_time=30)
def test_batch_timeout_reports_every_row(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(
        tmp_path / "in.jsonl",
        "".join(f'{{"video_id": "v{n}", "prompt": "p{n}"}}\n' for n in range(1, 6))
        + '{"video_id": "v6", "prompt": "p6", "cfg_scale": 2}\n',
    )
    result = invoke("batch", source, "--timeout", "0.5", "--concurrency", "2", *FAST)
    assert result.exit_code == 1
    rows = by_row(result.stdout)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[6]["error"]["field"] == "cfg_scale"
    timed_out = [rows[n]["error"] for n in range(1, 6)]
    assert {e["type"] for e in timed_out} == {"WaitTimeoutError"}
    assert all("--timeout (0.5 s)" in e["message"] for e in timed_out)
    assert sum("not started" in e["message"] for e in timed_out) == 3
    assert kling_env.counters.tasks_created == 2


@simulator(credit=3)
def test_batch_without_credit_reports_the_service_error(
    invoke: Invoke, kling_env: Simulator
) -> None:
    result = invoke("batch", EXAMPLES / "with-bad-row.jsonl", "--concurrency", "1", *FAST)
    assert result.exit_code == 1
    rows = by_row(result.stdout)
    assert sum(r["ok"] for r in rows.values()) == 3
    refused = [r["error"] for r in rows.values() if r["task"] is None and r["row"] != 5]
    assert len(refused) == 4
    for error in refused:
        assert error["type"] == "InsufficientBalanceError"
        assert (error["status"], error["code"]) == (429, 1102)
    assert kling_env.counters.tasks_created == 3


def test_batch_download_failure_fails_the_row(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(tmp_path / "in.jsonl", '{"video_id": "v1", "prompt": "one"}\n')
    journal = tmp_path / "journal"
    first = invoke("batch", source, "--journal", journal, "--no-wait", *FAST)
    assert first.exit_code == 0, first.stderr
    kling_env.inject("500", on="files", times=50)  # every try of the download
    result = invoke("batch", source, "--journal", journal, "--download", tmp_path / "b", *FAST)
    assert result.exit_code == 1
    (line,) = lines(result.stdout)
    assert line["ok"] is False
    assert line["task"]["task_status"] == "succeed"
    assert line["error"]["message"].startswith("row 1: download failed: ")
    assert line["file"] is None
    assert kling_env.counters.tasks_created == 1


def test_batch_rows_whose_ids_read_alike_get_a_file_each(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    long = "x" * 130  # cut at 120 characters: two ids alike up to there
    rows = [
        {"video_id": "v1", "prompt": "one", "external_task_id": "clip/1"},
        {"video_id": "v2", "prompt": "two", "external_task_id": "clip_1"},
        {"video_id": "v3", "prompt": "three", "external_task_id": long + "a"},
        {"video_id": "v4", "prompt": "four", "external_task_id": long + "b"},
    ]
    source = write(tmp_path / "in.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    result = invoke("batch", source, "--download", out, "--name-by", "external-id", *FAST)
    assert result.exit_code == 0, result.stderr
    files = {row: Path(line["file"]) for row, line in by_row(result.stdout).items()}
    assert len(set(files.values())) == 4
    assert {files[1].name, files[2].name} == {"clip_1.mp4", "clip_1-2.mp4"}
    videos = {line["task"]["task_result"]["videos"][0]["url"] for line in lines(result.stdout)}
    assert len(videos) == 4
    contents = {path.read_bytes() for path in files.values()}
    assert len(contents) == 4  # each file holds its own row's video


def test_batch_rerun_with_new_prompts_never_takes_an_earlier_batchs_file(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first_input = write(tmp_path / "first.jsonl", '{"video_id": "v1", "prompt": "sunset"}\n')
    first = invoke("batch", first_input, "--download", out, *FAST)
    assert first.exit_code == 0, first.stderr
    (earlier,) = (Path(line["file"]) for line in lines(first.stdout))
    earlier_bytes = earlier.read_bytes()
    # Same video, new prompt, same folder: its own journal (beside its own input).
    second_input = write(tmp_path / "second.jsonl", '{"video_id": "v1", "prompt": "sunrise"}\n')
    second = invoke("batch", second_input, "--download", out, *FAST)
    assert second.exit_code == 0, second.stderr
    (line,) = lines(second.stdout)
    assert earlier.name == "1-v1.mp4"
    assert line["file"] == str(out / "1-v1-2.mp4")
    assert earlier.read_bytes() == earlier_bytes  # the earlier batch's video, untouched
    assert Path(line["file"]).read_bytes() != earlier_bytes
    assert "saved by an earlier run" not in second.stderr
    # Without a journal nothing records the files: an existing one is never taken either.
    third = invoke("batch", first_input, "--download", out, "--no-journal", *FAST)
    assert lines(third.stdout)[0]["file"] == str(out / "1-v1-3.mp4")


def test_batch_run_again_reports_the_files_it_saved_before_as_its_own(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(tmp_path / "in.jsonl", '{"video_id": "v1", "prompt": "a"}\n')
    out = tmp_path / "out"
    first = invoke("batch", source, "--download", out, *FAST)
    (saved,) = (Path(line["file"]) for line in lines(first.stdout))
    inode = saved.stat().st_ino
    again = invoke("batch", source, "--download", out, *FAST)
    assert again.exit_code == 0, again.stderr
    assert [Path(line["file"]) for line in lines(again.stdout)] == [saved]
    assert saved.stat().st_ino == inode  # not downloaded again
    assert f"{saved} saved by an earlier run" in again.stderr
    assert kling_env.counters.tasks_created == 1
    # The record of saved files lost: the file is not taken on trust, a new one is saved.
    (tmp_path / "in.jsonl.journal.sqlite.files.json").unlink()
    lost = invoke("batch", source, "--download", out, *FAST)
    assert [line["file"] for line in lines(lost.stdout)] == [str(out / "1-v1-2.mp4")]
    assert kling_env.counters.tasks_created == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("batch", "rows.txt"), "--format"),
        (("batch", "rows.jsonl", "--out", "rows.jsonl"), "--out"),
        (("batch", "rows.jsonl", "--no-wait", "--download", "d"), "--no-wait"),
        (("batch", "missing.jsonl"), "missing.jsonl"),
    ],
)
def test_batch_usage_errors(
    invoke: Invoke,
    kling_env: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "rows.txt", "")
    write(tmp_path / "rows.jsonl", '{"video_id": "v1", "prompt": "p"}\n')
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert kling_env.counters.requests == 0


def test_batch_csv_header_problems_exit_2(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(tmp_path / "in.csv", "video_id,prompt,prompt\nv1,a,b\n")
    result = invoke("batch", source)
    assert result.exit_code == 2
    assert "prompt more than once" in result.stderr
    latin = tmp_path / "latin.csv"
    latin.write_bytes("video_id,prompt\nv1,caf\xe9\n".encode("latin-1"))
    undecodable = invoke("batch", latin)
    assert undecodable.exit_code == 2
    assert "cannot read" in undecodable.stderr


# -- live displays on a terminal ---------------------------------------------------------------


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Progress goes to a fake terminal, so the live displays run."""
    screen = io.StringIO()

    def console() -> Console:
        return Console(file=screen, force_terminal=True, width=120, highlight=False)

    monkeypatch.setattr(_cli_progress, "stderr_console", console)
    return screen


def test_live_displays_on_a_terminal(
    invoke: Invoke, kling_env: Simulator, terminal: io.StringIO, tmp_path: Path
) -> None:
    result = invoke("batch", EXAMPLES / "with-bad-row.jsonl", "--download", tmp_path, *FAST)
    assert result.exit_code == 1
    check_sample_results(by_row(result.stdout))  # stdout untouched by the display
    shown = ANSI.sub("", terminal.getvalue())
    assert "8/8" in shown
    assert "7 ok" in shown
    bad = next(line for line in shown.splitlines() if "cfg_scale" in line)
    assert bad.split()[:3] == ["✗", "5", "invalid"]
    # (the problem wraps within its own column)
    assert "cfg_scale: must be a number from 0 to 1" in bad
    assert "(given: 1.5)" in shown
    assert "batch done: 7 ok, 1 failed" in shown
    task = lines(result.stdout)[-1]["task"]
    assert invoke("wait", task["task_id"], *FAST).exit_code == 0
    assert invoke("download", task["task_id"], tmp_path / "copy.mp4").exit_code == 0
    assert "succeed" in terminal.getvalue()


def live_display(
    width: int, total: int = 2
) -> tuple[io.StringIO, Console, _cli_progress.LiveBatchDisplay]:
    """A live batch display on a fake terminal `width` columns wide: (its screen, its
    console, the display)."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=width, highlight=False)
    return screen, console, _cli_progress.LiveBatchDisplay(total, console, rows=True)


def test_what_an_interrupted_batch_leaves_running_is_said_above_the_live_display() -> None:
    # Written to stderr beside the live display, the line was drawn over when the
    # display stopped: the user pressing Ctrl-C saw only "interrupted".
    screen, _, display = live_display(140, total=3)
    with display:
        display.row_state(1, "processing", "v-input-1")
        display.note("2 rows' tasks go on at Kling: run the same command again to collect them")
    shown = ANSI.sub("", screen.getvalue())
    assert "2 rows' tasks go on at Kling: run the same command again" in shown


@pytest.mark.parametrize("width", [80, 100, 118, 119, 160])
def test_a_rows_file_is_never_folded_whatever_the_terminal_width(width: int) -> None:
    # At 80 columns the "file / problem" column had one character: the path came out
    # one letter per line. Too narrow a terminal puts it on a line of its own.
    from kling_async._cli._rows_out import RowOutcome

    path = "downloads/6-828006748715380782.mp4"
    outcome = RowOutcome(
        row=6,
        ok=True,
        status="succeed",
        video_id="401912071833105005",
        duration=9.5,
        file=path,
        source_video_id="828006748715380782",
        elapsed=2.1,
    )
    screen, console, display = live_display(width)
    with display:
        display.row_state(1, "processing", "v-input-1")
        console.print(display._renderable())
        display.row_done(outcome)
    lines = [line.rstrip() for line in ANSI.sub("", screen.getvalue()).splitlines()]
    assert all(len(line) <= width for line in lines)
    row = next(line for line in lines if line.startswith("✓"))
    assert row.split()[:3] == ["✓", "6", "succeed"]
    if width >= 119:
        assert row.endswith(path)
        assert any("file / problem" in line for line in lines)
    else:
        assert lines[lines.index(row) + 1].strip() == path
        assert not any("file / problem" in line for line in lines)


def test_batch_rows_keep_their_columns_from_in_flight_to_finished() -> None:
    from kling_async._cli._rows_out import RowOutcome

    screen, console, display = live_display(140)
    with display:
        display.row_state(1, "queued", "v-input-1")
        display.row_state(1, "processing")  # the video column stays the input's
        console.print(display._renderable())
        display.row_done(
            RowOutcome(
                row=1,
                ok=True,
                status="succeed",
                video_id="v-result-1",
                duration=5.1,
                file="d/1-v-input-1.mp4",
                source_video_id="v-input-1",
                elapsed=12.0,
            )
        )
    text = ANSI.sub("", screen.getvalue()).splitlines()
    headers = [line for line in text if line.split()[:3] == ["row", "status", "video"]]
    assert headers, text
    header = headers[0]
    columns = ["row", "status", "video", "result", "length", "time", "file", "/", "problem"]
    assert header.split() == columns
    flying = next(line for line in text if "processing" in line)
    done = next(line for line in text if "succeed" in line)
    for line in (flying, done):
        assert line.index("v-input-1") == header.index("video")  # the input's id, always
    assert done.index("v-result-1") == header.index("result")
    assert "v-result" not in flying
    # Right-aligned numbers end where their headers end: a duration under "length" only
    # once there is a video; the time since the row was read under "time".
    assert done.index("5.1 s") + len("5.1 s") == header.index("length") + len("length")
    assert done.index("12.0 s") + len("12.0 s") == header.index("time") + len("time")
    assert flying.rstrip().endswith(" s")
    flying_time = flying.rstrip().rsplit(" ", 2)[-2] + " s"
    assert flying.rindex(flying_time) + len(flying_time) == header.index("time") + len("time")


@simulator(processing_time=0.05)
def test_batch_summary_counts_one_row_as_a_row(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = write(tmp_path / "one.jsonl", '{"video_id": "v1", "prompt": "a"}\n')
    result = invoke("batch", source, "--no-journal", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "batch done: 1 ok, 0 failed, 1 row in " in result.stderr


# -- simulate ----------------------------------------------------------------------------------


def test_simulate_serves_until_interrupted(invoke: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "kling_async", "simulate", "--port", "0", "--processing-time", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline().strip()
        assert first.startswith("export KLING_BASE_URL=")
        assert "KLING_API_KEY=" in first
        exported = dict(pair.split("=", 1) for pair in first.removeprefix("export ").split())
        assert set(exported) == {"KLING_BASE_URL", "KLING_API_KEY"}
        for name, value in exported.items():
            monkeypatch.setenv(name, value)
        for name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
            monkeypatch.delenv(name, raising=False)
        result = invoke("extend", VIDEO, "the sun sets", "--wait", "--json", *FAST)
        assert result.exit_code == 0, result.stderr
        assert lines(result.stdout)[0]["task_status"] == "succeed"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:  # pragma: no cover - only when the test fails
            server.kill()
            server.wait()
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


def test_simulate_on_a_busy_port_suggests_port_0(invoke: Invoke) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("simulate", "--port", str(port))
    assert result.exit_code == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--port 0" in result.stderr
    assert "Traceback" not in result.stderr


# -- the README's main command --------------------------------------------------------------


def test_readme_sample_batch_runs_against_the_built_in_simulator(
    invoke: Invoke, no_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kling-async batch examples/batch.jsonl --simulate=auto --download downloads/`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "kling-async batch examples/batch.jsonl --simulate=auto --download downloads/"
    assert command in readme
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "batch", EXAMPLES / "batch.jsonl", "--simulate=auto", "--download", "downloads/"
    )
    assert result.exit_code == 0, result.stderr
    rows = by_row(result.stdout)
    assert sorted(rows) == list(range(1, 9))
    assert all(row["ok"] for row in rows.values())
    files = sorted((tmp_path / "downloads").iterdir())
    assert len(files) == 8
    assert all(Path(row["file"]).exists() for row in rows.values())
    assert "built-in simulator" in result.stderr
    journal = EXAMPLES / "batch.jsonl.journal.sqlite"
    assert f"journal: {journal}" in result.stderr

    # The same command again: nothing new is created, the files are the same videos.
    again = invoke("batch", EXAMPLES / "batch.jsonl", "--simulate=auto", "--download", "downloads/")
    assert again.exit_code == 0, again.stderr
    assert "rows finished before come from it" in again.stderr
    rows_again = by_row(again.stdout)
    assert {r["task"]["task_id"] for r in rows_again.values()} == {
        r["task"]["task_id"] for r in rows.values()
    }
    assert sorted((tmp_path / "downloads").iterdir()) == files
    assert all(f.read_bytes()[4:8] == b"ftyp" for f in files)


def test_batch_no_journal_and_stdin_keep_none(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text((EXAMPLES / "batch.jsonl").read_text().splitlines()[0] + "\n")
    assert invoke("batch", source, "--no-journal", *FAST).exit_code == 0
    assert invoke("batch", "-", *FAST, input=source.read_text()).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    assert kling_env.counters.tasks_created == 2
    first = invoke("batch", source, *FAST)
    second = invoke("batch", source, *FAST)
    assert kling_env.counters.tasks_created == 3
    assert "journal:" in first.stderr and "come from it" in second.stderr
    assert invoke("batch", source, "--no-journal", "--journal", "j").exit_code == 2


def test_batch_with_a_wrong_key_stops_at_the_first_request_and_exits_2(
    invoke: Invoke, kling_env: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLING_API_KEY", f"sk-wrong-{uuid.uuid4().hex}")
    result = invoke("batch", EXAMPLES / "batch.jsonl", *FAST)
    assert result.exit_code == 2
    assert "KLING_API_KEY" in result.stderr
    assert kling_env.counters.requests == 1
    assert kling_env.counters.tasks_created == 0


def test_download_to_a_new_directory_with_a_trailing_slash(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = created(invoke)
    video = task["task_result"]["videos"][0]
    monkeypatch.chdir(tmp_path)
    result = invoke("download", task["task_id"], "new/")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "new").is_dir()
    assert (tmp_path / "new" / f"{video['id']}.mp4").read_bytes()[4:8] == b"ftyp"


def test_advice_that_works(
    invoke: Invoke, kling_env: Simulator, no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # extend --simulate: the simulator ends with the command, so `wait ID` cannot work.
    simulated = invoke("extend", VIDEO, "a prompt", "--simulate")
    assert simulated.exit_code == 0, simulated.stderr
    assert "kling-async wait" not in simulated.stderr
    assert "kling-async simulate" in simulated.stderr
    # A plain http:// URL to another host: the CLI's own flag is named, and works.
    monkeypatch.setenv("KLING_API_KEY", SECRET)
    insecure = invoke("status", "123", "--base-url", "http://gateway.invalid", "--simulate=never")
    assert insecure.exit_code == 2
    assert "--allow-insecure" in insecure.stderr


def test_allow_insecure_and_an_unreachable_host_is_named(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLING_API_KEY", SECRET)
    result = invoke(
        "status",
        "123",
        "--base-url",
        "http://unreachable.invalid:9",
        "--allow-insecure",
        "--request-timeout",
        "5",
    )
    assert result.exit_code != 0
    assert "--allow-insecure" not in result.stderr
    assert "unreachable.invalid:9" in result.stderr


def test_a_wrong_csv_header_is_one_error_before_anything_is_sent(
    invoke: Invoke, kling_env: Simulator, tmp_path: Path
) -> None:
    source = tmp_path / "rows.csv"
    rows = "".join(f"v{n},scene {n},x\n" for n in range(300))
    source.write_text("video,promt,seed\n" + rows, encoding="utf-8")
    result = invoke("batch", source, *FAST)
    assert result.exit_code == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message  # one line, not one per row
    assert "unknown columns video, promt, seed" in message
    assert "missing required columns video_id, prompt" in message
    assert kling_env.counters.requests == 0


# -- credits and costs ------------------------------------------------------------------


@simulator(resource_packs=[SimPack(name="Main pack", total=50)])
def test_credits_json_when_piped_and_units_in_status(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("credits")
    assert result.exit_code == 0, result.stderr
    (pack,) = lines(result.stdout)
    assert (pack["name"], pack["total"], pack["remaining"]) == ("Main pack", 50.0, 50.0)
    assert pack["status"] == "online" and pack["usable"] is True
    assert pack["expires_at"].endswith("+00:00")
    task = created(invoke, external="order-7")
    text = invoke("status", task["task_id"])
    assert "expires: " in text.stdout
    assert "units deducted: 1" in text.stdout
    again = lines(invoke("credits", "--json").stdout)
    assert again[0]["remaining"] == 49.0


@simulator(prefix="/kling")
def test_credits_against_a_gateway_says_it_is_not_offered(
    invoke: Invoke, kling_env: Simulator
) -> None:
    result = invoke("credits")
    assert result.exit_code == 1
    assert "does not offer /account/costs" in result.stderr


@simulator(resource_packs=[SimPack(total=100)])
def test_batch_prints_the_usable_remainder_and_units_billed(
    invoke: Invoke, kling_env: Simulator
) -> None:
    result = invoke("batch", EXAMPLES / "batch.jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "100 units usable before the batch" in result.stderr
    assert "92 units usable now" in result.stderr
    assert "8 units billed for these tasks" in result.stderr


@simulator(prefix="/kling")
def test_batch_on_a_gateway_says_nothing_of_credits(invoke: Invoke, kling_env: Simulator) -> None:
    result = invoke("batch", EXAMPLES / "batch.jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "units usable" not in result.stderr
