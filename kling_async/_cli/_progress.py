"""Progress on stderr: live rich displays on a terminal, plain lines otherwise.

Nothing here writes to stdout, which carries results. A batch's live display lists the
rows in flight with their state under a progress bar, and prints finished rows above
itself (all of them when stdout is the same terminal, else only the failures).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import attrs
import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kling_async import BatchProgress, Task
from kling_async._cli._rows_out import RowOutcome, detail_column_fits, row_table, seconds


def stderr_console() -> Console:
    """The console progress goes to (tests replace it to see the live displays)."""
    return Console(stderr=True, highlight=False)


#: The most rows in flight the live display lists (the rest are counted).
_SHOWN_IN_FLIGHT = 10


class BatchDisplay:
    """Plain progress: one line on stderr per finished row, and a summary at the end.

    Rows in flight pass through `row_state` (queued, submitted, processing,
    downloading); the plain display ignores those, the live one lists them.
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.ok = 0
        self.failed = 0
        self.running = 0
        #: Units billed for the finished rows, as far as the service said.
        self.units = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> BatchDisplay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def update(self, progress: BatchProgress) -> None:
        """Take the batch's latest counters (`extend_many`'s ``on_progress``)."""
        self.running = progress.running

    def row_state(self, row: int, state: str, video_id: str | None = None) -> None:
        """A row in flight is now in `state` (shown by the live display only)."""

    def row_done(self, outcome: RowOutcome) -> None:
        """Count a finished row and report it."""
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
        if outcome.units is not None:
            self.units += outcome.units
        self._show_row(outcome)

    def _show_row(self, outcome: RowOutcome) -> None:
        click.echo(outcome.describe(), err=True)

    def note(self, text: str) -> None:
        """A line for the user on stderr (above the live display, when there is one)."""
        click.echo(text, err=True)

    def summary(self) -> str:
        """``batch done: 7 ok, 1 failed, 8 rows in 5.2 s, 7 units billed for these tasks``.

        The units are those of the rows' tasks, whichever run created them: a run that
        finishes from its journal bills nothing new (the packs' remainder says so)."""
        rows = self.ok + self.failed
        elapsed = time.monotonic() - self._started
        counted = "1 row" if rows == 1 else f"{rows} rows"
        text = f"batch done: {self.ok} ok, {self.failed} failed, {counted} in {elapsed:.1f} s"
        return text + (f", {self.units:g} units billed for these tasks" if self.units else "")

    def finish(self) -> None:
        """Print the summary line."""
        click.echo(self.summary(), err=True)


@attrs.define
class _InFlight:
    state: str
    video_id: str | None
    since: float


class LiveBatchDisplay(BatchDisplay):
    """A live rich display: finished rows print above a bar and the rows in flight.

    Args:
        total: rows in the input, when known.
        console: the terminal (stderr).
        rows: whether finished rows are printed here (stdout is the same terminal and
            carries no JSON), or only failures (the rows go to stdout as JSON lines).
    """

    def __init__(self, total: int | None, console: Console, *, rows: bool = True) -> None:
        super().__init__(total)
        self._console = console
        self._print_rows = rows
        self._in_flight: dict[int, _InFlight] = {}
        self._printed_header = False
        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[running]} running[/]"
            ),
            TimeElapsedColumn(),
            console=console,
        )
        self._live = Live(
            console=console,
            # Redrawn on every change (and by the refresh thread: elapsed times tick).
            get_renderable=self._renderable,
            refresh_per_second=4,
            # stdout to a file or a pipe must stay exactly as written.
            redirect_stdout=False,
            redirect_stderr=True,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> LiveBatchDisplay:
        self._task = self._progress.add_task("batch", total=self.total, ok=0, failed=0, running=0)
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in_flight.clear()
        self._refresh()
        self._live.stop()

    def note(self, text: str) -> None:
        # Through the live display's console, which prints it above the bar: written to
        # stderr beside it, the line would be drawn over when the display stops.
        self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _renderable(self) -> RenderableType:
        if not self._in_flight:
            return self._progress
        now = time.monotonic()
        # The finished rows' columns, each meaning the same in flight: the input's video
        # id, no result or length yet, the time since the row was read.
        detail = detail_column_fits(self._console.width)
        table = row_table(header=True, detail=detail)
        shown = sorted(self._in_flight.items())[:_SHOWN_IN_FLIGHT]
        for row, flight in shown:
            cells = [
                Text("·", style="dim"),
                Text(str(row)),
                Text(flight.state, style=_STATE_STYLES.get(flight.state, "")),
                Text(flight.video_id or "", style="dim"),
                Text(""),
                Text(""),
                Text(seconds(now - flight.since), style="dim"),
            ]
            table.add_row(*cells, *([Text("")] if detail else []))
        hidden = len(self._in_flight) - len(shown)
        parts: list[RenderableType] = [table]
        if hidden > 0:
            parts.append(Text(f"  … and {hidden} more in flight", style="dim"))
        parts.append(self._progress)
        return Group(*parts)

    def _refresh(self) -> None:
        if self._task is not None:
            self._progress.update(
                self._task,
                completed=self.ok + self.failed,
                ok=self.ok,
                failed=self.failed,
                running=self.running,
            )

    def update(self, progress: BatchProgress) -> None:
        """Take the batch's latest counters and redraw."""
        super().update(progress)
        self._refresh()

    def row_state(self, row: int, state: str, video_id: str | None = None) -> None:
        """List a row in flight with its state (and how long since it was read)."""
        previous = self._in_flight.get(row)
        if previous is not None and previous.state == state:
            return
        video = video_id or (previous.video_id if previous is not None else None)
        since = previous.since if previous is not None else time.monotonic()
        self._in_flight[row] = _InFlight(state, video, since)

    def _show_row(self, outcome: RowOutcome) -> None:
        self._in_flight.pop(outcome.row, None)
        self._refresh()
        # Redraw first, so that the live part's height is the one printing moves over.
        self._live.refresh()
        if self._print_rows or not outcome.ok:
            shown = outcome.render(header=not self._printed_header, width=self._console.width)
            self._console.print(shown)
            self._printed_header = True

    def finish(self) -> None:
        """Print the summary line below the bar."""
        self._console.print(self.summary(), markup=False, style="bold")


_STATE_STYLES = {
    "queued": "dim",
    "submitted": "yellow",
    "processing": "cyan",
    "downloading": "magenta",
}


def batch_display(total: int | None, *, rows: bool) -> BatchDisplay:
    """A live display on a terminal (printing finished rows if `rows`), plain lines else."""
    console = stderr_console()
    if console.is_terminal:
        return LiveBatchDisplay(total, console, rows=rows)
    return BatchDisplay(total)


@contextlib.contextmanager
def task_status_display(task_id: str) -> Iterator[Callable[[Task], None]]:
    """A spinner showing a task's status on a terminal, else a line per status change.

    Yields the ``on_update`` callback to hand to `wait_for_task`.
    """
    console = stderr_console()
    if not console.is_terminal:

        def show_line(task: Task) -> None:
            click.echo(f"task {task.task_id}: {task.raw_status}", err=True)

        yield show_line
        return
    with console.status(f"task {task_id}: waiting") as spinner:

        def show(task: Task) -> None:
            spinner.update(f"task {task.task_id}: {task.raw_status}")

        yield show


@contextlib.contextmanager
def download_display(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar for one download on a terminal (nothing otherwise).

    Yields the ``on_progress`` callback to hand to `KlingClient.download`.
    """
    console = stderr_console()
    if not console.is_terminal:
        yield lambda done, total: None
        return
    progress = Progress(
        TextColumn(label, markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        bar = progress.add_task(label, total=None)

        def show(done: int, total: int | None) -> None:
            progress.update(bar, completed=done, total=total)

        yield show
