"""The ``kling-async`` command's entry point (the commands live in `kling_async._cli_app`).

The command line needs the ``cli`` extra (click and rich); without it, `main` says how
to install it instead of failing with a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

_EXTRA_MODULES = ("click", "rich")


def main(argv: Sequence[str] | None = None, *, prog_name: str = "kling-async") -> None:
    """Run the ``kling-async`` command with `argv` (default: the process's arguments)."""
    try:
        from kling_async._cli_app import cli
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
