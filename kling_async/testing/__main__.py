"""Serve the simulator in the foreground: `python -m kling_async.testing --port 8765`.

The one entry point of the stand-alone simulator: ``kling-async simulate`` runs this too,
with the same options and defaults. Once listening it prints, flushed, a line a shell can
run as it is, ``export KLING_BASE_URL=... KLING_API_KEY=...`` (pasted, every client and
command talks to the simulator), then ``export KLING_FILES_URL=...``, and serves until
Ctrl-C or SIGTERM (exit 0). A port in use is said so (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import sys
from collections.abc import Sequence

from ._simulator import Simulator

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a simulator of Kling's video-extend API until Ctrl-C.",
        epilog=(
            "example: %(prog)s --port 8765 & then paste the export line it prints, and "
            "every kling-async command and KlingClient() talks to the simulator"
        ),
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8765, help="API port, 0 for any (default 8765)")
    add("--files-port", type=int, default=0, help="result files port (default: any)")
    add("--prefix", default="", help="path prefix of the base URL, e.g. /kling")
    add("--api-key", default="sim-api-key", help="accepted bearer key")
    add("--access-key", default="sim-access-key", help="accepted JWT issuer")
    add("--secret-key", default="sim-secret-key", help="JWT HS256 secret")
    add("--submit-time", type=float, default=0.5, help="seconds in 'submitted'")
    add("--processing-time", type=float, default=3.0, help="seconds in 'processing'")
    add(
        "--time-spread",
        type=float,
        default=0.0,
        help="vary each task's times by up to this fraction, in [0, 1) (default 0)",
    )
    add("--state", default=None, metavar="FILE", help="remember tasks and ports in FILE")
    add("--failure-rate", type=float, default=0.0, help="fraction of tasks that fail")
    add("--running-limit", type=int, default=None, help="max running tasks (429/1303)")
    add("--credit", type=int, default=None, help="tasks the account may create (429/1102)")
    add("--seed", type=int, default=None, help="random seed")
    add("--webhook-secret", default=None, help="whsec_... secret to sign callbacks")
    add("--file-size", type=int, default=0, help="pad each result MP4 to this many bytes")
    return parser


def _announce(simulator: Simulator) -> None:
    # One line a shell can run as it is (the key is the simulator's own, not a secret).
    print(
        f"export KLING_BASE_URL={simulator.base_url} KLING_API_KEY={simulator.api_key or ''}",
        flush=True,
    )
    print(f"export KLING_FILES_URL={simulator.files_base_url}", flush=True)
    print("Serving the simulator; press Ctrl-C to stop.", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace) -> None:
    simulator = Simulator(
        api_key=args.api_key,
        access_key=args.access_key,
        secret_key=args.secret_key,
        prefix=args.prefix,
        submit_time=args.submit_time,
        processing_time=args.processing_time,
        failure_rate=args.failure_rate,
        running_limit=args.running_limit,
        credit=args.credit,
        seed=args.seed,
        webhook_secret=args.webhook_secret,
        host=args.host,
        port=args.port,
        file_size=args.file_size,
        files_port=args.files_port,
        time_spread=args.time_spread,
        state_path=args.state,
    )
    await simulator.serve_until_signalled(_announce)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m kling_async.testing") -> int:
    """Parse `argv`, serve until interrupted, and return the exit status."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if not 0.0 <= args.time_spread < 1.0:
        parser.error("--time-spread must be in [0, 1)")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args))
    except ValueError as exc:  # an unreadable --state file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        print(
            f"error: port {args.port} on {args.host} is in use: pick another with --port, "
            "or --port 0 for any free one (the export line then names it)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
