"""Progress on stderr: live rich displays on a terminal, plain lines otherwise.

Nothing here writes to stdout, which carries results: a batch's live display prints
result lines above itself only when stdout is the same terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import attrs
import click
from rich.console import Console
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

from kling_async._batch import BatchProgress
from kling_async._models import Task


def stderr_console() -> Console:
    """The console progress goes to (tests replace it to see the live displays)."""
    return Console(stderr=True, highlight=False)


def _status(task: Task) -> str:
    return task.raw_status or task.status.value


@attrs.frozen
class RowOutcome:
    """One finished batch row, as the progress display reports it."""

    row: int
    ok: bool
    task_id: str | None = None
    status: str | None = None
    problem: str | None = None
    file: str | None = None

    def describe(self) -> str:
        """``row 3: ok, task 8280... succeed`` or ``row 5: failed: cfg_scale: ...``."""
        if not self.ok:
            return f"row {self.row}: failed: {self.problem}"
        text = f"row {self.row}: ok, task {self.task_id} {self.status}"
        return f"{text}, saved {self.file}" if self.file else text


class BatchDisplay:
    """Plain progress: one line on stderr per finished row, and a summary at the end."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.ok = 0
        self.failed = 0
        self.running = 0
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

    def row_done(self, outcome: RowOutcome) -> None:
        """Count a finished row and report it."""
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
        self._show_row(outcome)

    def _show_row(self, outcome: RowOutcome) -> None:
        click.echo(outcome.describe(), err=True)

    def summary(self) -> str:
        """``batch done: 7 ok, 1 failed, 8 rows in 5.2 s``."""
        rows = self.ok + self.failed
        elapsed = time.monotonic() - self._started
        return f"batch done: {self.ok} ok, {self.failed} failed, {rows} rows in {elapsed:.1f} s"

    def finish(self) -> None:
        """Print the summary line."""
        click.echo(self.summary(), err=True)


class LiveBatchDisplay(BatchDisplay):
    """A live rich progress bar with ok, failed and running counts; failures print above."""

    def __init__(self, total: int | None, console: Console) -> None:
        super().__init__(total)
        self._console = console
        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[running]} running[/]"
            ),
            TimeElapsedColumn(),
            console=console,
            # Result lines for a terminal go through `print_above`; stdout to a file or
            # a pipe must stay exactly as written.
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self._task: TaskID | None = None

    def print_above(self, line: str) -> None:
        """Print a line above the live display, as it is (no markup, no wrapping)."""
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True, end="")

    def __enter__(self) -> LiveBatchDisplay:
        self._progress.start()
        self._task = self._progress.add_task("batch", total=self.total, ok=0, failed=0, running=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._refresh()
        self._progress.stop()

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

    def _show_row(self, outcome: RowOutcome) -> None:
        if not outcome.ok:
            self._progress.console.print(outcome.describe(), markup=False, style="red")
        self._refresh()

    def finish(self) -> None:
        """Print the summary line below the bar."""
        self._console.print(self.summary(), markup=False)


def batch_display(total: int | None) -> BatchDisplay:
    """A live display on a terminal, plain lines otherwise."""
    console = stderr_console()
    if console.is_terminal:
        return LiveBatchDisplay(total, console)
    return BatchDisplay(total)


@contextlib.contextmanager
def task_status_display(task_id: str) -> Iterator[Callable[[Task], None]]:
    """A spinner showing a task's status on a terminal, else a line per status change.

    Yields the ``on_update`` callback to hand to `wait_for_task`.
    """
    console = stderr_console()
    if not console.is_terminal:

        def show_line(task: Task) -> None:
            click.echo(f"task {task.task_id}: {_status(task)}", err=True)

        yield show_line
        return
    with console.status(f"task {task_id}: waiting") as spinner:

        def show(task: Task) -> None:
            spinner.update(f"task {task.task_id}: {_status(task)}")

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
