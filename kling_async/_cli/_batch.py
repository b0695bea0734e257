"""The ``batch`` command: many extensions from JSONL or CSV, one JSON result line per row.

Rows are read lazily and only valid ones reach `KlingClient.extend_many`; a bad row
becomes an error line at once and sends nothing. Each result line,

```
{"row": 3, "ok": true, "task": {...}, "error": null, "file": "downloads/8280.mp4"}
```

is written and flushed as soon as its row finishes (completion order), so a crash loses
nothing already reported, and ``--journal`` lets a rerun pick up where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import IO, Any, cast

import click

from kling_async._cli._progress import BatchDisplay, LiveBatchDisplay, RowOutcome, batch_display
from kling_async._cli._rows_in import (
    FORMATS,
    BadRow,
    InputError,
    Row,
    count_rows,
    input_format,
    read_csv,
    read_jsonl,
)
from kling_async._cli._rows_out import JsonLinesWriter, error_document, task_document
from kling_async._cli._runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliCommand,
    ClientOptions,
    CommandError,
    client_options,
    report,
    run_with_client,
)
from kling_async._client import KlingClient
from kling_async._deadlines import within
from kling_async._models import BatchResult, ExtendRequest, Task
from kling_async.errors import KlingError


class BatchRun:
    """One run of the ``batch`` command over an open client.

    Args:
        client: the client to use.
        rows: the input's rows, read lazily.
        writer: where result lines go.
        display: progress on stderr.
        concurrency: the most rows in flight (and downloads running) at once.
        journal: `extend_many`'s journal file.
        download_dir: save each succeeded video here, if given.
        wait: False to finish rows once their task is created.
    """

    def __init__(
        self,
        client: KlingClient,
        rows: Iterator[Row],
        *,
        writer: JsonLinesWriter,
        display: BatchDisplay,
        concurrency: int | None = None,
        journal: Path | None = None,
        download_dir: Path | None = None,
        wait: bool = True,
    ) -> None:
        self._client = client
        self._rows = rows
        self._writer = writer
        self._display = display
        self._concurrency = concurrency or client.max_in_flight
        self._journal = journal
        self._download_dir = download_dir
        self._wait = wait
        #: `extend_many` index -> row number, for rows in flight.
        self._row_of_index: dict[int, int] = {}
        #: Rows read and sent on, without a result line yet (with the last task seen).
        self._unfinished: dict[int, Task | None] = {}
        self._downloads: set[asyncio.Task[None]] = set()
        self.failed = 0

    async def run(self, timeout: float | None = None) -> int:
        """Run every row; return the exit code (0 all ok, 1 some failed).

        Raises:
            CommandError: the input could not be read (exit code 2).
        """
        try:
            try:
                await within(self._consume(), timeout)
            except asyncio.TimeoutError:
                assert timeout is not None
                self._time_out(timeout)
        except InputError as error:
            raise CommandError(f"cannot read the input: {error}", EXIT_USAGE) from None
        return EXIT_FAILED if self.failed else EXIT_OK

    def _requests(self) -> Iterator[ExtendRequest]:
        index = 0
        for row in self._rows:
            if isinstance(row, BadRow):
                self._emit(row.number, error=row.error_document(), problem=row.problem)
                continue
            self._row_of_index[index] = row.number
            self._unfinished[row.number] = None
            index += 1
            yield row.request

    async def _consume(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        results = cast(
            "AsyncGenerator[BatchResult, None]",
            self._client.extend_many(
                self._requests(),
                concurrency=self._concurrency,
                wait=self._wait,
                journal=self._journal,
                on_progress=self._display.update,
            ),
        )
        try:
            async with contextlib.aclosing(results):
                async for result in results:
                    row = self._row_of_index.pop(result.index)
                    if result.ok and self._download_dir is not None:
                        self._unfinished[row] = result.task
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
        try:
            try:
                path = await self._client.download(result.task, self._download_dir)
            except FileExistsError as error:
                path = Path(error.filename)
                if not path.is_file():
                    self._download_failed(row, result.task, error)
                    return
                # An earlier run saved it: downloads are renamed into place only when whole.
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
        if result.error is not None:
            document = error_document(result.error, row=row)
            self._emit(row, task=result.task, error=document, problem=str(result.error))
        else:
            self._emit(row, task=result.task)

    def _emit(
        self,
        row: int,
        *,
        task: Task | None = None,
        error: dict[str, Any] | None = None,
        problem: str | None = None,
        file: Path | None = None,
    ) -> None:
        ok = error is None and task is not None
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
        if not ok:
            self.failed += 1
        self._display.row_done(
            RowOutcome(
                row=row,
                ok=ok,
                task_id=task.task_id if task is not None else None,
                status=(task.raw_status or task.status.value) if task is not None else None,
                problem=problem,
                file=str(file) if file is not None else None,
            )
        )

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


@click.command(cls=CliCommand, short_help="Run many extensions from a JSONL or CSV file.")
@click.argument(
    "input_path",
    metavar="INPUT",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
)
@click.option(
    "--format",
    "format_name",
    type=click.Choice(FORMATS),
    help="Input format [default: from INPUT's extension, .jsonl or .csv; stdin: jsonl].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the result lines to FILE (replaced) instead of stdout.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="Most rows in flight at once [default: --max-in-flight].",
)
@click.option(
    "--journal",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="SQLite file recording every row. Rerun the same INPUT with the same journal "
    "after a crash or a --timeout: finished rows come from the journal and submitted "
    "ones are polled, so no task is created twice.",
)
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Save each succeeded video into DIR (created if missing) as <video id>.mp4; "
    'its path goes in the result line\'s "file".',
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Finish each row once its task is created, without waiting for the video.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after SECONDS in all. Rows not finished by then get an error line (their "
    "tasks go on: rerun with the same --journal to collect them).",
)
@client_options
def batch(
    input_path: str,
    format_name: str | None,
    out: Path | None,
    concurrency: int | None,
    journal: Path | None,
    download_dir: Path | None,
    no_wait: bool,
    timeout: float | None,
    client: ClientOptions,
) -> None:
    """Extend many videos: one row of INPUT (JSONL or CSV, "-" for stdin) per task.

    Keys (JSONL) or columns (CSV) are the fields of an extension: video_id and prompt
    (required), negative_prompt, cfg_scale (0 to 1), callback_url, external_task_id,
    watermark (CSV: true/false, 1/0, yes/no) and parent_task_id. A JSON null or an empty
    CSV cell means "not given"; an unknown field makes the row bad.

    Prints one JSON line per row, in the order rows finish:
    {"row": N, "ok": ..., "task": {...}, "error": {...} or null, "file": ... or null}.
    A bad row gets an error line naming the row, the field and the rule, sends nothing,
    and the batch goes on. Progress goes to stderr.

    Exits 0 when every row succeeded, 1 when any failed, 2 on a usage problem.

    \b
    Example:
      kling-async batch examples/batch.jsonl --download downloads/ --out results.jsonl
    """
    if no_wait and download_dir is not None:
        raise click.UsageError("--download needs finished videos: it cannot go with --no-wait")
    try:
        fmt = input_format(input_path, format_name)
    except InputError as error:
        raise click.UsageError(str(error)) from None
    if out is not None and input_path != "-" and out.resolve() == Path(input_path).resolve():
        raise click.UsageError("--out must not be the input file")
    with contextlib.ExitStack() as stack:
        try:
            rows = _open_rows(stack, input_path, fmt)
            if download_dir is not None:
                download_dir.mkdir(parents=True, exist_ok=True)
            output = stack.enter_context(out.open("wb")) if out is not None else None
        except (InputError, OSError) as error:
            report(str(error))
            click.get_current_context().exit(EXIT_USAGE)
        total = count_rows(Path(input_path), fmt) if input_path != "-" else None
        display = batch_display(total)
        echo = None
        if output is None and isinstance(display, LiveBatchDisplay) and sys.stdout.isatty():
            echo = display.print_above

        async def body(kling: KlingClient) -> int:
            run = BatchRun(
                kling,
                rows,
                writer=JsonLinesWriter(output, echo=echo),
                display=display,
                concurrency=concurrency,
                journal=journal,
                download_dir=download_dir,
                wait=not no_wait,
            )
            with display:
                code = await run.run(timeout)
            display.finish()
            return code

        code = run_with_client(client, body)
    click.get_current_context().exit(code)
