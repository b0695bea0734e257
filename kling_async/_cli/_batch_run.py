"""One run of the ``batch`` command: many extensions from JSONL or CSV, a result per row.

Rows are read lazily and only valid ones reach `KlingClient.extend_many`; a bad row
becomes an error result at once and sends nothing. The first row sent goes alone, so a
wrong key or an empty account stops the batch after one request, not one per row.
On a terminal each finished row is a readable line; to a file or a pipe (or with
``--json``) it is a JSON line,

```
{"row": 3, "ok": true, "task": {...}, "error": null, "file": "downloads/3-v3.mp4"}
```

written and flushed as soon as its row finishes (completion order), so a crash loses
nothing already reported, and ``--journal`` lets a rerun pick up where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import click

from kling_async import BatchProgress, BatchResult, ExtendRequest, KlingClient, Task
from kling_async._cli._options import ClientOptions
from kling_async._cli._progress import BatchDisplay, LiveBatchDisplay, batch_display
from kling_async._cli._rows_in import (
    BadRow,
    InputError,
    Row,
    count_rows,
    input_format,
    read_csv,
    read_jsonl,
)
from kling_async._cli._rows_out import (
    JsonLinesWriter,
    ReadableRows,
    RowOutcome,
    error_document,
    task_document,
    usable_units,
)
from kling_async._cli._runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    notice,
    report,
    run_with_client,
)
from kling_async._cli._saved_files import SavedFiles, record_path, safe_stem
from kling_async._deadlines import within
from kling_async.errors import AuthenticationError, KlingError, TaskFailedError


def file_stem(row: int, task: Task, request: ExtendRequest, naming: str, width: int) -> str:
    """The name a row's video is saved under (``--name-by``), without ``.mp4``.

    Two rows may get one stem (``clip/1`` and ``clip_1``): `SavedFiles.new_name` makes
    the names unique.
    """
    if naming == "video":
        key = task.videos[0].id
    elif naming == "external-id":
        key = task.external_task_id or request.external_task_id or task.task_id
    else:
        key = f"{row:0{width}d}-{request.external_task_id or request.video_id}"
    return safe_stem(key)


class BatchRun:
    """One run of the ``batch`` command over an open client.

    Args:
        client: the client to use.
        rows: the input's rows, read lazily.
        writer: where JSON result lines go (None: not written).
        readable: where readable rows go on stdout (None: not printed there).
        display: progress on stderr.
        concurrency: the most rows in flight (and downloads running) at once.
        journal: `extend_many`'s journal file.
        download_dir: save each succeeded video here, if given.
        naming: how saved videos are named (one of `NAMINGS`).
        total: rows in the input, when known (pads the row numbers in file names).
        wait: False to finish rows once their task is created.
    """

    def __init__(
        self,
        client: KlingClient,
        rows: Iterator[Row],
        *,
        writer: JsonLinesWriter | None,
        readable: ReadableRows | None = None,
        display: BatchDisplay,
        concurrency: int | None = None,
        journal: Path | None = None,
        download_dir: Path | None = None,
        naming: str = "row",
        total: int | None = None,
        wait: bool = True,
    ) -> None:
        self._client = client
        self._rows = rows
        self._writer = writer
        self._readable = readable
        self._display = display
        self._concurrency = concurrency or client.max_in_flight
        self._journal = journal
        self._download_dir = download_dir
        self._saved = SavedFiles(
            record_path(journal) if journal is not None and download_dir is not None else None
        )
        self._naming = naming
        self._width = len(str(total)) if total else 1
        self._wait = wait
        #: `extend_many` index -> row number, for rows in flight.
        self._row_of_index: dict[int, int] = {}
        #: Row number -> the row's request as read (before the batch adds ids), in flight.
        self._request_of_row: dict[int, ExtendRequest] = {}
        #: Rows read and sent on, without a result line yet (with the last task seen).
        self._unfinished: dict[int, Task | None] = {}
        self._downloads: set[asyncio.Task[None]] = set()
        #: Row number -> when it was read (the readable rows' ``time`` column).
        self._read_at: dict[int, float] = {}
        #: Set once the first row sent has an answer: the other rows wait for it.
        self._first_answer = asyncio.Event()
        self.failed = 0

    async def run(self, timeout: float | None = None) -> int:
        """Run every row; return the exit code (0 all ok, 1 some failed).

        Raises:
            CommandError: the input could not be read (exit code 2).
            AuthenticationError: the service refused the credentials (at the first row).
        """
        try:
            try:
                await within(self._consume(), timeout)
            except asyncio.TimeoutError:
                assert timeout is not None
                self._time_out(timeout)
            except asyncio.CancelledError:  # Ctrl-C: `asyncio.run` cancels the command
                self._interrupted()
                raise
        except InputError as error:
            raise CommandError(f"cannot read the input: {error}", EXIT_USAGE) from None
        return EXIT_FAILED if self.failed else EXIT_OK

    def _row_status(self, index: int, task: Task) -> None:
        row = self._row_of_index.get(index)
        if row is not None:
            if row in self._unfinished:
                self._unfinished[row] = task
            self._display.row_state(row, task.raw_status)

    def _interrupted(self) -> None:
        """Say what an interrupted batch leaves running, and how to collect it."""
        running = sorted(
            ((row, task) for row, task in self._unfinished.items() if task),
            key=lambda item: item[0],
        )
        if not running:
            return
        rows = "1 row's task goes" if len(running) == 1 else f"{len(running)} rows' tasks go"
        note = self._display.note
        if self._journal is not None:
            note(
                f"{rows} on at Kling: run the same command again to collect them "
                f"(journal: {_shown_path(self._journal.absolute())}; nothing is created twice)"
            )
            return
        note(f"{rows} on at Kling (no journal): collect each with kling-async wait")
        for row, task in running:
            note(f"  row {row}: kling-async wait {task.task_id}")

    async def _requests(self) -> AsyncIterator[ExtendRequest]:
        index = 0
        for row in self._rows:
            if isinstance(row, BadRow):
                self._emit(row.number, error=row.error_document(), problem=row.problem)
                continue
            if index == 1:
                # The first row goes alone: a wrong key or an empty account then costs
                # one request, not one per row.
                await self._first_answer.wait()
            self._row_of_index[index] = row.number
            self._unfinished[row.number] = None
            self._read_at[row.number] = time.monotonic()
            self._request_of_row[row.number] = row.request
            self._display.row_state(row.number, "queued", row.request.video_id)
            index += 1
            yield row.request

    def _progress(self, progress: BatchProgress) -> None:
        if progress.submitted or progress.failed or progress.succeeded:
            self._first_answer.set()
        self._display.update(progress)

    async def _consume(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        # The display follows each row's task status through the per-item `on_update`.
        results = self._client.extend_many(
            self._requests(),
            concurrency=self._concurrency,
            wait=self._wait,
            journal=self._journal,
            on_progress=self._progress,
            on_update=self._row_status,
        )
        try:
            async with contextlib.aclosing(results):
                async for result in results:
                    self._first_answer.set()
                    if isinstance(result.error, AuthenticationError):
                        raise result.error  # no other row can do better: stop at once
                    row = self._row_of_index.pop(result.index)
                    if result.ok and self._download_dir is not None:
                        self._unfinished[row] = result.task
                        self._display.row_state(row, "downloading")
                        await slots.acquire()
                        download = asyncio.ensure_future(self._download(row, result, slots))
                        self._downloads.add(download)
                        download.add_done_callback(self._downloads.discard)
                    else:
                        self._emit_result(row, result)
            while self._downloads:
                await asyncio.gather(*self._downloads)
        finally:
            for download in self._downloads:
                download.cancel()
            await asyncio.gather(*self._downloads, return_exceptions=True)

    async def _download(self, row: int, result: BatchResult, slots: asyncio.Semaphore) -> None:
        assert result.task is not None
        assert self._download_dir is not None
        request = self._request_of_row.get(row, result.request)
        video_id = result.task.videos[0].id
        try:
            # An earlier run of this batch saved this row's video: the record says so.
            before = self._saved.saved_before(row, video_id)
            if before is not None:
                self._emit(row, task=result.task, file=before, saved_before=True)
                return
            stem = file_stem(row, result.task, request, self._naming, self._width)
            try:
                target = self._saved.new_name(row, self._download_dir, stem)
                path = await self._client.download(result.task, target)
                self._saved.record(row, path, video_id)
            except FileExistsError as error:  # a file appeared there meanwhile: not ours
                error.strerror = "a file appeared there while the video was downloading"
                self._download_failed(row, result.task, error)
                return
            except (KlingError, OSError) as error:
                self._download_failed(row, result.task, error)
                return
            self._emit(row, task=result.task, file=path)
        finally:
            slots.release()

    def _download_failed(self, row: int, task: Task, error: Exception) -> None:
        document = error_document(error, row=row, context="download failed: ")
        self._emit(row, task=task, error=document, problem=f"download failed: {error}")

    def _emit_result(self, row: int, result: BatchResult) -> None:
        if result.error is None:
            self._emit(row, task=result.task)
            return
        document = error_document(result.error, row=row)
        problem = str(result.error)
        if isinstance(result.error, TaskFailedError):
            message = result.task.status_message if result.task is not None else None
            problem = f"the task failed: {message or 'no reason given'}"
        self._emit(row, task=result.task, error=document, problem=problem)

    def _emit(
        self,
        row: int,
        *,
        task: Task | None = None,
        error: dict[str, Any] | None = None,
        problem: str | None = None,
        file: Path | None = None,
        saved_before: bool = False,
    ) -> None:
        ok = error is None and task is not None
        if self._writer is not None:
            self._writer.write(
                {
                    "row": row,
                    "ok": ok,
                    "task": task_document(task) if task is not None else None,
                    "error": error,
                    "file": str(file) if file is not None else None,
                }
            )
        self._unfinished.pop(row, None)
        request = self._request_of_row.pop(row, None)
        read_at = self._read_at.pop(row, None)
        if not ok:
            self.failed += 1
        video = task.videos[0] if task is not None and task.videos else None
        if task is not None:
            status = task.raw_status
        else:
            status = "invalid" if error is not None and "field" in error else "error"
        outcome = RowOutcome(
            row=row,
            ok=ok,
            status=status,
            video_id=video.id if video is not None else None,
            duration=video.duration if video is not None else None,
            problem=problem,
            file=_shown_path(file) if file is not None else None,
            saved_before=saved_before,
            units=task.units_deducted if task is not None else None,
            source_video_id=request.video_id if request is not None else None,
            elapsed=time.monotonic() - read_at if read_at is not None else None,
        )
        if self._readable is not None:
            self._readable.write(outcome)
        self._display.row_done(outcome)

    def _time_out(self, timeout: float) -> None:
        """Report every row without a result line yet, read or not, as timed out."""
        reason = f"--timeout ({timeout:g} s) ran out"
        for row, task in sorted(self._unfinished.items()):
            problem = (
                f"not finished when {reason}; its task goes on: rerun with the same "
                "--journal to collect it"
            )
            error = {"type": "WaitTimeoutError", "message": f"row {row}: {problem}"}
            self._emit(row, task=task, error=error, problem=problem)
        for rest in self._rows:
            if isinstance(rest, BadRow):
                self._emit(rest.number, error=rest.error_document(), problem=rest.problem)
                continue
            problem = f"not started: {reason} first"
            error = {"type": "WaitTimeoutError", "message": f"row {rest.number}: {problem}"}
            self._emit(rest.number, error=error, problem=problem)


def default_journal(input_path: Path) -> Path:
    """The journal a batch keeps when none is named: beside its input."""
    return input_path.with_name(input_path.name + ".journal.sqlite")


def announce_journal(journal: Path) -> None:
    """The batch's first line: which journal it keeps, and whether this run resumes one."""
    shown = _shown_path(journal.absolute())
    if journal.exists():
        click.echo(
            f"journal: {shown} (found: rows finished before come from it and running ones "
            "are collected; no task is created twice)",
            err=True,
        )
    else:
        click.echo(
            f"journal: {shown} (run the same command again to pick up where it stopped; "
            "--no-journal to keep none)",
            err=True,
        )


async def usable_credit(kling: KlingClient) -> float | None:
    """Units left in the account's usable packs; None where the API does not say (gateways)."""
    try:
        packs = await kling.resource_packs()
    except AuthenticationError:
        raise  # a wrong key stops the batch here, before any row is sent
    except KlingError:
        return None  # a gateway without the call, or no answer: the batch says nothing
    return usable_units(packs)[0]


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _open_rows(stack: contextlib.ExitStack, path: str, fmt: str) -> Iterator[Row]:
    binary: IO[bytes] = sys.stdin.buffer if path == "-" else stack.enter_context(open_binary(path))
    if fmt == "jsonl":
        return read_jsonl(binary)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    # Closing the wrapper closes what it wraps: stdin itself is only let go of.
    stack.callback(text.detach if path == "-" else text.close)
    return read_csv(text)


def open_binary(path: str) -> IO[bytes]:
    """Open an input file for reading bytes."""
    return Path(path).open("rb")


def run_batch_command(
    input_path: str,
    *,
    format_name: str | None,
    out: Path | None,
    as_json: bool,
    concurrency: int | None,
    journal: Path | None,
    no_journal: bool,
    download_dir: Path | None,
    naming: str,
    no_wait: bool,
    timeout: float | None,
    client: ClientOptions,
) -> int:
    """The ``batch`` command's work, once click has parsed it; returns the exit code."""
    try:
        fmt = input_format(input_path, format_name)
    except InputError as error:
        raise click.UsageError(str(error)) from None
    if out is not None and input_path != "-" and out.resolve() == Path(input_path).resolve():
        raise click.UsageError("--out must not be the input file")
    if journal is None and not no_journal and input_path != "-":
        journal = default_journal(Path(input_path))
    with contextlib.ExitStack() as stack:
        try:
            rows = _open_rows(stack, input_path, fmt)
            if download_dir is not None:
                download_dir.mkdir(parents=True, exist_ok=True)
            output = stack.enter_context(out.open("wb")) if out is not None else None
        except (InputError, OSError) as error:
            report(str(error))
            return EXIT_USAGE
        total = count_rows(Path(input_path), fmt) if input_path != "-" else None
        # JSON lines to a file or a pipe (or when asked); readable rows on a terminal.
        readable_rows = output is None and not as_json and sys.stdout.isatty()
        display = batch_display(total, rows=readable_rows)
        writer = None if readable_rows else JsonLinesWriter(output)
        readable = None
        if readable_rows and not isinstance(display, LiveBatchDisplay):
            readable = ReadableRows()  # stderr is not the terminal: rows go to stdout

        async def body(kling: KlingClient) -> int:
            if journal is not None:
                announce_journal(journal)
            before = await usable_credit(kling)
            if before is not None:
                notice(f"resource packs: {before:g} units usable before the batch")
            run = BatchRun(
                kling,
                rows,
                writer=writer,
                readable=readable,
                display=display,
                concurrency=concurrency,
                journal=journal,
                download_dir=download_dir,
                naming=naming,
                total=total,
                wait=not no_wait,
            )
            with display:
                code = await run.run(timeout)
            display.finish()
            if before is not None:
                after = await usable_credit(kling)
                if after is not None:
                    notice(f"resource packs: {after:g} units usable now (Kling may lag)")
            return code

        state = journal.with_name(journal.name + ".sim-state.json") if journal else None
        return run_with_client(client, body, simulator_state=state)
