"""The ``batch`` command's declaration: its arguments and options (click alone).

What runs it lives in `kling_async._cli._batch_run`, imported when the command runs, so
``--help`` and usage errors load nothing but click.
"""

from __future__ import annotations

from pathlib import Path

import click

from kling_async._cli._options import (
    FORMATS,
    NAMINGS,
    CliCommand,
    ClientOptions,
    client_options,
)


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
    help="Write the JSON result lines to FILE (replaced) instead of stdout.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="JSON result lines on stdout even when it is a terminal (they always are when "
    "stdout is a file or a pipe).",
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
    help="SQLite file recording every row [default: INPUT.journal.sqlite beside the input; "
    "none for stdin]. Rerun the same command after a crash, a --timeout or Ctrl-C: "
    "finished rows come from the journal and submitted ones are polled, so no task is "
    "created twice.",
)
@click.option(
    "--no-journal",
    is_flag=True,
    help="Keep no journal: running the command again submits every row again.",
)
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Save each succeeded video into DIR (created if missing), named as --name-by "
    'says; its path goes in the result line\'s "file".',
)
@click.option(
    "--name-by",
    "naming",
    type=click.Choice(NAMINGS),
    default="row",
    show_default=True,
    help="Name saved videos <row>-<the row's external_task_id, else its video_id>.mp4 "
    "(row), <result video id>.mp4 (video), or <external_task_id>.mp4 (external-id). A name "
    "taken by another row, or by a file the journal does not record as this row's video, "
    "becomes NAME-2.mp4 (and so on).",
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
    as_json: bool,
    concurrency: int | None,
    journal: Path | None,
    no_journal: bool,
    download_dir: Path | None,
    naming: str,
    no_wait: bool,
    timeout: float | None,
    client: ClientOptions,
) -> None:
    """Extend many videos: one row of INPUT (JSONL or CSV, "-" for stdin) per task.

    Keys (JSONL) or columns (CSV) are the fields of an extension: video_id and prompt
    (required), negative_prompt, cfg_scale (0 to 1), callback_url, external_task_id,
    watermark (CSV: true/false, 1/0, yes/no) and parent_task_id. A JSON null or an empty
    CSV cell means "not given"; an unknown field makes the row bad.

    Reports each row as it finishes. On a terminal: a readable line under a header (row,
    status, input video id, result video id, its length, time since the row was read,
    saved file or the error), above a live display of the rows in flight in the same
    columns. To a file or a pipe, or with --json: one JSON line per row,
    {"row": N, "ok": ..., "task": {...}, "error": {...} or null, "file": ... or null}.
    A bad row is reported naming the row, the field, the rule and the value given,
    sends nothing, and the batch goes on. Progress goes to stderr.

    Keeps a journal by default (INPUT.journal.sqlite beside the input; the first line on
    stderr names it), so the same command run twice never creates a task twice: the
    second run finishes from the journal and says so. --no-journal keeps none; input
    from stdin has none unless --journal is given. With --simulate, the simulator keeps
    its tasks beside the journal (JOURNAL.sim-state.json), so Ctrl-C and the same
    command again finish every row, as with Kling.

    Exits 0 when every row succeeded, 1 when any failed, 2 on a usage problem or when
    the service refuses the credentials (the batch stops at the first row).

    \b
    Examples:
      kling-async batch examples/batch.jsonl --simulate --download downloads/
      kling-async batch rows.csv --journal rows.journal --download downloads/ --out results.jsonl
    """
    if no_wait and download_dir is not None:
        raise click.UsageError("--download needs finished videos: it cannot go with --no-wait")
    if no_journal and journal is not None:
        raise click.UsageError("--journal and --no-journal cannot go together")
    from kling_async._cli._batch_run import run_batch_command

    code = run_batch_command(
        input_path,
        format_name=format_name,
        out=out,
        as_json=as_json,
        concurrency=concurrency,
        journal=journal,
        no_journal=no_journal,
        download_dir=download_dir,
        naming=naming,
        no_wait=no_wait,
        timeout=timeout,
        client=client,
    )
    click.get_current_context().exit(code)
