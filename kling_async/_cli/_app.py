"""The ``kling-async`` command group and its single-task commands.

``extend``, ``status``, ``wait``, ``list`` and ``download`` work on one task (or one
page of them); ``batch`` lives in `kling_async._cli._batch`; ``simulate`` serves the
simulator in the foreground. Only click is imported here: each command's body imports
what it runs on (the client, rich) when it runs, so ``--help`` stays quick.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kling_async._cli import Interrupted
from kling_async._cli._batch import batch
from kling_async._cli._options import (
    MAX_PAGE,
    MAX_PAGE_SIZE,
    CliCommand,
    ClientOptions,
    client_options,
    version_option,
)

if TYPE_CHECKING:
    from kling_async._client import KlingClient

F = TypeVar("F", bound=Callable[..., Any])

_JSON_HELP = "Print the task as the service's JSON (one line) instead of text."
_WAIT_TIMEOUT = 900.0


def _wait_timeout_option(help_text: str) -> Callable[[F], F]:
    """The ``--timeout SECONDS`` option of the commands that wait for a task."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0),
        default=_WAIT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help=help_text,
    )


class _Group(click.Group):
    command_class = CliCommand

    # Ctrl-C while click parses or a command imports what it runs (start-up is spent
    # there): carried past click's "Aborted!" to `main`, which says "interrupted".
    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            raise Interrupted from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@version_option()
def cli() -> None:
    """Extend videos with Kling's video-extend API, from the command line.

    Credentials come from the environment only (never from options, which would land
    in your shell history): KLING_API_KEY (a gateway's key), or KLING_ACCESS_KEY and
    KLING_SECRET_KEY (the official API). KLING_BASE_URL sets the API root. Add
    --simulate to any command to try it against a built-in simulator instead.

    Exit status: 0 success, 1 a task (or a batch row) failed, 2 a usage or
    configuration problem.

    \b
    Examples:
      kling-async extend 828006748715380777 "make the waves roll in" --wait
      kling-async status 842250903629086785 --json   (a task id, as extend prints)
      kling-async batch examples/batch.jsonl --download downloads/
      kling-async batch examples/batch.jsonl --simulate --download downloads/
    """


def _finish(code: int) -> None:
    click.get_current_context().exit(code)


def _run(client: ClientOptions, body: Callable[[KlingClient], Any]) -> None:
    """Run a command's body with a client, then exit with its code.

    What runs a command (aiohttp, rich, the client) is imported here, when it runs:
    ``--help`` and usage errors need click alone.
    """
    from kling_async._cli._runtime import run_with_client

    _finish(run_with_client(client, body))


@cli.command(short_help="Create one extension task (and optionally wait for it).")
@click.argument("video_id")
@click.argument("prompt")
@click.option("--negative-prompt", metavar="TEXT", help="What the extension should avoid.")
@click.option(
    "--cfg-scale",
    type=click.FloatRange(0, 1),
    metavar="FLOAT",
    help="How closely to follow the prompt, from 0 to 1.",
)
@click.option("--callback-url", metavar="URL", help="Where Kling POSTs the task's updates.")
@click.option(
    "--external-task-id",
    metavar="ID",
    help="Your own id for the task [default: a fresh UUID, which makes retries safe].",
)
@click.option("--watermark/--no-watermark", default=None, help="Ask for a watermark or none.")
@click.option(
    "--parent-task-id", metavar="ID", help="The task that made VIDEO_ID (some gateways want it)."
)
@click.option("--wait", "wait_", is_flag=True, help="Wait for the result and print it.")
@_wait_timeout_option("With --wait: give up waiting after SECONDS (the task goes on).")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@client_options
def extend(
    video_id: str,
    prompt: str,
    negative_prompt: str | None,
    cfg_scale: float | None,
    callback_url: str | None,
    external_task_id: str | None,
    watermark: bool | None,
    parent_task_id: str | None,
    wait_: bool,
    timeout: float,
    as_json: bool,
    client: ClientOptions,
) -> None:
    """Extend the video VIDEO_ID by 4-5 s, following PROMPT.

    Prints the new task; with --wait, waits for it (a spinner on a terminal) and prints
    the finished task, exiting 1 if it failed.

    \b
    Example:
      kling-async extend 828006748715380777 "the camera pulls back" --cfg-scale 0.5 --wait
    """

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._rows_out import print_task
        from kling_async._cli._runtime import EXIT_OK, simulated
        from kling_async._cli._waiting import wait_and_print

        task = await kling.extend_video(
            video_id,
            prompt,
            negative_prompt=negative_prompt,
            cfg_scale=cfg_scale,
            callback_url=callback_url,
            external_task_id=external_task_id,
            watermark=watermark,
            parent_task_id=parent_task_id,
        )
        if wait_:
            # A line that stays: the spinner below is erased when the wait ends.
            click.echo(f"task {task.task_id} created; waiting for it", err=True)
            return await wait_and_print(kling, task, timeout, as_json=as_json)
        print_task(task, as_json=as_json)
        if not as_json and simulated(kling):
            click.echo(
                "The built-in simulator ends with this command, and its task with it: "
                "use --wait, or serve a lasting one with `kling-async simulate` and point "
                "KLING_BASE_URL at it.",
                err=True,
            )
        elif not as_json:
            click.echo(f"Wait for it with: kling-async wait {task.task_id}", err=True)
        return EXIT_OK

    _run(client, body)


@cli.command(short_help="Show one task.")
@click.argument("task_id")
@click.option(
    "--external", is_flag=True, help="TASK_ID is your external_task_id, not Kling's task_id."
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@client_options
def status(task_id: str, external: bool, as_json: bool, client: ClientOptions) -> None:
    """Show the task TASK_ID: its status, and its video once it has succeeded."""

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._rows_out import print_task

        if external:
            task = await kling.get_task(external_task_id=task_id)
        else:
            task = await kling.get_task(task_id)
        print_task(task, as_json=as_json)
        return 0

    _run(client, body)


@cli.command(short_help="Wait for a task to finish.")
@click.argument("task_id")
@_wait_timeout_option("Give up after SECONDS (the task goes on; exit 1).")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@client_options
def wait(task_id: str, timeout: float, as_json: bool, client: ClientOptions) -> None:
    """Wait until the task TASK_ID succeeds or fails, and print it.

    Shows the task's status on a terminal as it changes. Exits 0 if it succeeded, 1 if
    it failed or the time ran out.
    """

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._waiting import wait_and_print

        return await wait_and_print(kling, task_id, timeout, as_json=as_json)

    _run(client, body)


@cli.command("list", short_help="List your tasks, newest first.")
@click.option("--page", type=click.IntRange(1, MAX_PAGE), default=1, show_default=True)
@click.option("--page-size", type=click.IntRange(1, MAX_PAGE_SIZE), default=30, show_default=True)
@click.option("--all", "all_pages", is_flag=True, help="Every page, not just --page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one task per line.")
@client_options
def list_(page: int, page_size: int, all_pages: bool, as_json: bool, client: ClientOptions) -> None:
    """List your tasks, newest first: a table, or JSON Lines with --json."""

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._rows_out import print_json, print_task_table, task_document
        from kling_async._cli._runtime import EXIT_OK

        if all_pages:
            if as_json:
                async for task in kling.iter_tasks(page_size):
                    print_json(task_document(task))
                return EXIT_OK
            tasks = [task async for task in kling.iter_tasks(page_size)]
        else:
            tasks = await kling.list_tasks(page, page_size)
        if as_json:
            for task in tasks:
                print_json(task_document(task))
        elif not print_task_table(tasks):
            click.echo("no tasks", err=True)
        return EXIT_OK

    _run(client, body)


@cli.command(short_help="Save a task's video to a file.")
@click.argument("task_id")
@click.argument("dest", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
@client_options
def download(task_id: str, dest: str, overwrite: bool, client: ClientOptions) -> None:
    """Save the video of the succeeded task TASK_ID to DEST and print its path.

    DEST is a file, or a directory where the video is saved as <video id>.mp4: an
    existing one, or one written with a trailing slash (created if missing). The file
    appears only once it is complete.
    """

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._progress import download_display
        from kling_async._cli._rows_out import saved
        from kling_async._cli._runtime import EXIT_FAILED, EXIT_OK, report

        task = await kling.get_task(task_id)
        if not task.succeeded or not task.videos:
            state = task.raw_status
            report(
                f"task {task_id} is {state}: it has no video to download"
                + ("" if task.is_terminal else f" yet (try: kling-async wait {task_id})")
            )
            return EXIT_FAILED
        if dest.endswith(("/", os.sep)):  # a directory, as written (Path() drops the slash)
            os.makedirs(dest, exist_ok=True)
        with download_display(task.videos[0].id) as show:
            path = await kling.download(task, dest, overwrite=overwrite, on_progress=show)
        saved(path)
        return EXIT_OK

    _run(client, body)


@cli.command(short_help="Show the account's resource packs (official API).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one pack per line.")
@client_options
def credits(as_json: bool, client: ClientOptions) -> None:
    """Show the account's resource packs: name, type, remaining of total, status, expiry.

    A table on a terminal; JSON Lines (one pack per line) to a file or a pipe, or with
    --json. Kling may report the remainder up to 12 hours late. Gateways usually do not
    offer this call (exit 1, saying so).
    """

    async def body(kling: KlingClient) -> int:
        from kling_async._cli._rows_out import (
            pack_document,
            print_json,
            print_pack_table,
            usable_units,
        )
        from kling_async._cli._runtime import EXIT_OK

        packs = await kling.resource_packs()
        if as_json or not sys.stdout.isatty():
            for pack in packs:
                print_json(pack_document(pack))
        elif not print_pack_table(packs):
            click.echo("no resource packs", err=True)
        if not as_json and sys.stdout.isatty() and packs:
            units, count = usable_units(packs)
            click.echo(f"usable: {units:g} units in {count} pack(s)", err=True)
        return EXIT_OK

    _run(client, body)


@cli.command(
    short_help="Serve the simulator in the foreground.",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def simulate(options: tuple[str, ...]) -> None:
    """Serve a simulator of Kling's video-extend API until Ctrl-C.

    The same program as ``python -m kling_async.testing``, with the same options and
    defaults (``kling-async simulate --help`` lists them: port, task times, failure
    rate, running limit, credit, webhook secret, a state file...). It prints an "export
    KLING_BASE_URL=... KLING_API_KEY=..." line: paste it into your shell (the key is
    the simulator's own, not a secret) and every command talks to the simulator.

    \b
    Example:
      kling-async simulate --port 8765 &
      export KLING_BASE_URL=http://127.0.0.1:8765 KLING_API_KEY=sim-api-key
      kling-async extend 828006748715380777 "the sun sets" --wait
    """
    from kling_async.testing.__main__ import main

    _finish(main(list(options), prog="kling-async simulate"))


cli.add_command(batch)
