"""The ``kling-async`` command: its entry point `main`, and its click group `cli`.

The modules behind it, each owning one thing:

- `kling_async._cli._options`: the options the commands share, and their choices;
- `kling_async._cli._app`: the command group and the single-task commands;
- `kling_async._cli._batch`: the ``batch`` command's arguments and options;
- `kling_async._cli._batch_run`: one run of a batch, rows in to results and files out;
- `kling_async._cli._waiting`: waiting for one task, and what Ctrl-C leaves behind;
- `kling_async._cli._saved_files`: the file each batch row saved, and free names;
- `kling_async._cli._rows_in`: batch input, JSONL or CSV rows as requests or bad rows;
- `kling_async._cli._rows_out`: what goes to stdout, JSON lines or readable text;
- `kling_async._cli._progress`: the live displays on stderr;
- `kling_async._cli._runtime`: the backend, the built-in simulator, exit codes.

The first three import click and nothing heavy: ``--help`` and usage errors load only
them; a command imports what runs it when it runs.

`cli` is imported on first use (``from kling_async._cli import cli`` works), so that
importing this package costs nothing beyond `kling_async` itself. The command line
needs the ``cli`` extra (click and rich); without it, `main` says how to install it.
"""

from __future__ import annotations

import os
import sys

# Only what `main` needs to catch a Ctrl-C is imported before it runs (not even typing:
# mypy treats any `TYPE_CHECKING` as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from kling_async._cli._app import cli as cli

__all__ = ["Interrupted", "cli", "main"]

_EXTRA_MODULES = ("click", "rich")
#: The exit status of a command interrupted by Ctrl-C (128 + SIGINT), as shells report it.
_EXIT_INTERRUPTED = 130


class Interrupted(BaseException):
    """Ctrl-C inside click's own `main`, carried past it.

    click turns a `KeyboardInterrupt` into "Aborted!" and exit status 1; the command
    group re-raises one as this (which click lets through), so that `main` answers it
    as every other Ctrl-C: "interrupted", exit status 130.
    """


def __getattr__(name: str) -> object:
    if name == "cli":
        from kling_async._cli._app import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None, *, prog_name: str = "kling-async") -> None:
    """Run the ``kling-async`` command with `argv` (default: the process's arguments).

    Ctrl-C at any point, while the command starts up as well as while it runs, ends it
    with one "interrupted" line on stderr and exit status 130, never a traceback.
    """
    try:
        _run(argv, prog_name)
    except (KeyboardInterrupt, Interrupted):
        _interrupted()


def _run(argv: Sequence[str] | None, prog_name: str) -> None:
    try:
        from kling_async._cli._app import cli
    except ImportError as error:  # pragma: no cover - only without the cli extra
        if error.name not in _EXTRA_MODULES:
            raise
        print(
            f"{prog_name} needs the cli extra ({error.name} is missing): "
            "python3 -m pip install 'kling-async[cli]'",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=prog_name)
    except BrokenPipeError:  # pragma: no cover - e.g. `kling-async list --json | head -1`
        # Python would complain again when it flushes stdout at exit: point it elsewhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _interrupted() -> None:
    """Say "interrupted" and exit 130, however far the start-up had got."""
    import contextlib

    with contextlib.suppress(OSError, ValueError):  # stdout or stderr closed or gone
        sys.stdout.flush()  # result lines already written stay written
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    # Exit at once: a second Ctrl-C during the interpreter's own shutdown (or a thread
    # still starting) must not print a traceback either.
    os._exit(_EXIT_INTERRUPTED)
