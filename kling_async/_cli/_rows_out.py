"""What the CLI prints on stdout: tasks as the service's JSON, as text, or as a table.

JSON output is the task's wire shape (``converter.unstructure``), one object per line,
so ``--json`` output reads like what ``GET /v1/videos/video-extend/{id}`` answers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
from rich.console import Console
from rich.table import Table

from kling_async._converter import converter
from kling_async._models import Task, TaskStatus
from kling_async.errors import APIStatusError, ValidationError

#: Width of tables written to a file or a pipe.
_WIDE = 200

_STATUS_STYLES = {
    TaskStatus.SUCCEED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.PROCESSING: "cyan",
    TaskStatus.SUBMITTED: "yellow",
}


def stdout_console() -> Console:
    """A console on stdout that never wraps lines (URLs stay copyable)."""
    return Console(highlight=False, soft_wrap=True)


def task_document(task: Task) -> dict[str, Any]:
    """The task as the service's JSON object."""
    document: dict[str, Any] = converter.unstructure(task)
    return document


def write_stdout(data: bytes) -> None:
    """Write bytes to stdout and flush.

    The bytes (UTF-8, whatever the locale) go to the binary buffer when there is one.
    """
    stream = sys.stdout
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(data.decode())
        stream.flush()
        return
    stream.flush()
    buffer.write(data)
    buffer.flush()


def print_json(document: Any) -> None:
    """Print one JSON value on its own line."""
    write_stdout(orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE))


class JsonLinesWriter:
    """Writes JSON Lines to a file or stdout, flushing each line as it is written.

    Args:
        file: where the lines go (default: stdout).
        echo: prints a line on the terminal instead of stdout (a live display's
            ``print_above``, so lines appear above it).
    """

    def __init__(
        self, file: IO[bytes] | None = None, *, echo: Callable[[str], None] | None = None
    ) -> None:
        self._file = file
        self._echo = echo

    def write(self, document: Any) -> None:
        """Write one line and flush it, so a crash loses no line already written."""
        line = orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE)
        if self._file is None and self._echo is not None:
            self._echo(line.decode())
        elif self._file is None:
            write_stdout(line)
        else:
            self._file.write(line)
            self._file.flush()


def error_document(
    error: BaseException, *, row: int | None = None, context: str = ""
) -> dict[str, Any]:
    """An error as JSON: ``type`` and ``message``, and ``field``/``status``/... when known.

    The message starts with ``row N: `` when `row` is given, then `context`.
    """
    prefix = f"row {row}: " if row is not None else ""
    document: dict[str, Any] = {
        "type": type(error).__name__,
        "message": f"{prefix}{context}{error}",
    }
    if isinstance(error, ValidationError):
        document.update(field=error.field, rule=error.rule)
    elif isinstance(error, APIStatusError):
        document.update(status=error.status, code=error.code, request_id=error.request_id)
    elif isinstance(error, OSError) and error.filename is not None:
        document.update(file=str(error.filename))
    return document


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_text(task: Task) -> str:
    style = _STATUS_STYLES.get(task.status)
    text = task.raw_status or task.status.value
    return f"[{style}]{text}[/]" if style else text


def print_task(task: Task, *, as_json: bool) -> None:
    """Print a task: its JSON line, or a few lines of text."""
    if as_json:
        print_json(task_document(task))
        return
    console = stdout_console()
    console.print(f"task {task.task_id}: {_status_text(task)}", markup=True)
    lines = []
    if task.status_message:
        lines.append(f"  message: {task.status_message}")
    if task.external_task_id:
        lines.append(f"  external_task_id: {task.external_task_id}")
    lines.append(f"  created: {_when(task.created_at)}")
    lines.append(f"  updated: {_when(task.updated_at)}")
    if task.parent_video is not None:
        parent = task.parent_video
        lines.append(f"  parent video: {parent.id} ({parent.duration:g} s)")
    lines.extend(f"  video: {v.id} ({v.duration:g} s) {v.url}" for v in task.videos)
    for line in lines:
        console.print(line, markup=False)


def print_task_table(tasks: Iterable[Task]) -> int:
    """Print tasks as a table; return how many there were."""
    table = Table()
    table.add_column("task_id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("video", no_wrap=True)
    table.add_column("external_task_id", overflow="fold")
    count = 0
    for task in tasks:
        count += 1
        video = task.videos[0] if task.videos else None
        table.add_row(
            task.task_id,
            _status_text(task),
            _when(task.created_at),
            f"{video.id} ({video.duration:g} s)" if video else "-",
            task.external_task_id or "-",
        )
    if count:
        console = Console(highlight=False)
        if not console.is_terminal:  # a file or a pipe: no reason to cut ids short
            console = Console(highlight=False, width=_WIDE)
        console.print(table)
    return count


def saved(path: Path) -> None:
    """Print the path of a file written."""
    write_stdout(f"{path}\n".encode())
