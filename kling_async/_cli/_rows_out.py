"""What the CLI prints on stdout: tasks and batch rows, as JSON lines or as text.

JSON output is the task's wire shape (``converter.unstructure``), one object per line,
so ``--json`` output reads like what ``GET /v1/videos/video-extend/{id}`` answers. On a
terminal, a batch row is one readable line instead (`RowOutcome.render`): row, status,
video id, duration and saved file, or the error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final, Literal

import attrs
import orjson
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from kling_async._converter import converter
from kling_async._models import ResourcePack, Task, TaskStatus
from kling_async.errors import KlingError

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


#: Widths shared by finished rows and the live display's rows in flight.
STATUS_WIDTH = 11
VIDEO_WIDTH = 18  # Kling's ids have 18 digits; a longer id is cut with an ellipsis
#: The columns of a batch row, finished or in flight, each with one meaning throughout:
#: (header, width, justify). The last column (file or problem) takes the rest.
ROW_COLUMNS: tuple[tuple[str, int, Literal["left", "right"]], ...] = (
    ("", 1, "left"),  # ✓, ✗, or · in flight
    ("row", 5, "right"),
    ("status", STATUS_WIDTH, "left"),
    ("video", VIDEO_WIDTH, "left"),  # the row's input video id
    ("result", VIDEO_WIDTH, "left"),  # the extended video's id, once there is one
    ("length", 6, "right"),  # the extended video's duration
    ("time", 6, "right"),  # since the row was read: running, then in all
)


#: Width of the columns before "file / problem", with the space between columns.
_FIXED_WIDTH: Final = sum(width for _, width, _ in ROW_COLUMNS) + 2 * len(ROW_COLUMNS)
#: The narrowest "file / problem" column (a download path fits); on a narrower terminal
#: (under 119 columns) the file or problem goes on a line of its own below the row.
MIN_DETAIL_WIDTH: Final = 40


#: Where a file or problem on a line of its own starts: under the status column.
_DETAIL_INDENT: Final = ROW_COLUMNS[0][1] + ROW_COLUMNS[1][1] + 4


def detail_column_fits(width: int) -> bool:
    """Whether a terminal `width` columns wide has room for the "file / problem" column."""
    return width - _FIXED_WIDTH >= MIN_DETAIL_WIDTH


def row_table(*, header: bool, detail: bool = True) -> Table:
    """An empty table with the batch rows' columns (and their header, if `header`);
    without the "file / problem" column unless `detail`."""
    table = Table(
        box=None,
        show_header=header,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        header_style="bold",
    )
    for title, width, justify in ROW_COLUMNS:
        table.add_column(title, width=width, no_wrap=True, justify=justify, overflow="ellipsis")
    if detail:
        table.add_column("file / problem", ratio=1, overflow="fold")
    return table


def seconds(value: float | None) -> str:
    """A duration for the ``length`` and ``time`` columns."""
    return "" if value is None else f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


@attrs.frozen
class RowOutcome:
    """One finished batch row, as the readable output shows it.

    `status` is the task's status, ``"invalid"`` for a row that was never sent, or
    ``"error"`` for a row whose task could not be created; `source_video_id` is the
    row's own video id, `video_id` and `duration` the extended video's; `problem` says
    what went wrong (without the ``row N:`` prefix), `file` where the video was saved,
    `elapsed` the seconds since the row was read.
    """

    row: int
    ok: bool
    status: str
    video_id: str | None = None
    duration: float | None = None
    problem: str | None = None
    file: str | None = None
    source_video_id: str | None = None
    elapsed: float | None = None
    #: Units the row's task was billed, when the service says.
    units: float | None = None
    #: `file` was saved by an earlier run of the batch (its journal records it).
    saved_before: bool = False

    @property
    def file_note(self) -> str | None:
        """``d/3-x.mp4``, or ``d/3-x.mp4 (saved by an earlier run)``."""
        if self.file is None:
            return None
        return self.file + (" (saved by an earlier run)" if self.saved_before else "")

    def describe(self) -> str:
        """One plain line: ``row 3: succeed, video 8091... (9.4 s), saved d/3-x.mp4``."""
        text = f"row {self.row}: {self.status}"
        if self.video_id is not None:
            text += f", video {self.video_id}"
            if self.duration is not None:
                text += f" ({self.duration:g} s)"
        if self.file is not None and self.saved_before:
            text += f", {self.file} saved by an earlier run"
        elif self.file is not None:
            text += f", saved {self.file}"
        if self.problem is not None:
            text += f": {self.problem}"
        return text

    def cells(self) -> list[Text]:
        """The row's cells, in `ROW_COLUMNS` order and then file or problem."""
        style = "green" if self.ok else "red"
        detail = Text()
        if self.file_note is not None:
            detail.append(self.file_note)
        if self.problem is not None:
            detail.append(("; " if self.file else "") + self.problem, style="red")
        return [
            Text("✓" if self.ok else "✗", style=style),
            Text(str(self.row), style="bold"),
            Text(self.status, style=style),
            Text(self.source_video_id or "", style="dim"),
            Text(self.video_id or ""),
            Text(seconds(self.duration)),
            Text(seconds(self.elapsed), style="dim"),
            detail,
        ]

    def render(self, *, header: bool = False, width: int | None = None) -> RenderableType:
        """The row in the batch rows' columns (a long error wraps within its own); on a
        terminal `width` columns wide with no room for that column, the file or problem
        goes on an indented line of its own below the row."""
        cells = self.cells()
        if width is None or detail_column_fits(width):
            table = row_table(header=header)
            table.add_row(*cells)
            return table
        table = row_table(header=header, detail=False)
        table.add_row(*cells[:-1])
        if not cells[-1]:
            return table
        return Group(table, Padding(cells[-1], (0, 0, 0, _DETAIL_INDENT)))


class ReadableRows:
    """Prints finished rows as readable lines on stdout (a terminal), then a summary."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or stdout_console_wrapping()
        self._header = True

    def write(self, outcome: RowOutcome) -> None:
        """Print one finished row (the columns' header above the first)."""
        self._console.print(outcome.render(header=self._header, width=self._console.width))
        self._header = False


def stdout_console_wrapping() -> Console:
    """A console on stdout that wraps to the terminal's width (for readable rows)."""
    return Console(highlight=False)


#: What the command line's JSON shows of an error's `KlingError.parts`.
_SHOWN_PARTS: Final = ("field", "rule", "status", "code", "request_id")


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
    if isinstance(error, KlingError):
        _, parts = error.parts()
        document.update((key, parts[key]) for key in _SHOWN_PARTS if key in parts)
    elif isinstance(error, OSError) and error.filename is not None:
        document.update(file=str(error.filename))
    return document


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_text(task: Task) -> str:
    style = _STATUS_STYLES.get(task.status)
    text = task.raw_status
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
    if task.expires_at is not None:
        lines.append(f"  expires: {_when(task.expires_at)} (Kling deletes the results then)")
    if task.units_deducted is not None:
        lines.append(f"  units deducted: {task.units_deducted:g}")
    if task.parent_video is not None:
        parent = task.parent_video
        lines.append(f"  parent video: {parent.id} ({parent.duration:g} s)")
    for v in task.videos:
        lines.append(f"  video: {v.id} ({v.duration:g} s) {v.url}")
        if v.watermark_url is not None:
            lines.append(f"  watermarked: {v.watermark_url}")
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


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def pack_document(pack: ResourcePack) -> dict[str, Any]:
    """A resource pack as one JSON object (times as ISO 8601, UTC)."""
    return {
        "name": pack.name,
        "id": pack.id,
        "type": pack.type,
        "total": pack.total,
        "remaining": pack.remaining,
        "status": pack.status,
        "usable": pack.usable,
        "purchased_at": _iso(pack.purchased_at),
        "effective_at": _iso(pack.effective_at),
        "expires_at": _iso(pack.expires_at),
    }


def usable_units(packs: Iterable[ResourcePack]) -> tuple[float, int]:
    """Units left in the usable packs, and how many packs that is."""
    usable = [pack for pack in packs if pack.usable]
    return sum(pack.remaining for pack in usable), len(usable)


def print_pack_table(packs: Iterable[ResourcePack]) -> int:
    """Print resource packs as a table; return how many there were."""
    table = Table()
    for column in ("name", "type", "remaining", "status", "expires"):
        table.add_column(column, no_wrap=column != "name", overflow="fold")
    count = 0
    for pack in packs:
        count += 1
        style = "green" if pack.usable else "red"
        table.add_row(
            pack.name,
            pack.type,
            f"{pack.remaining:g} of {pack.total:g}",
            f"[{style}]{pack.status}[/]",
            _when(pack.expires_at),
        )
    if count:
        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=_WIDE)
        console.print(table)
    return count
