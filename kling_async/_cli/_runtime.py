"""What running a CLI command takes: the backend, the built-in simulator, exit codes.

A command body is an ``async`` function of a `KlingClient`; `run_with_client` picks
the backend (the real API, or a simulator started in-process on 127.0.0.1), runs the
body with `asyncio.run` and turns what it raised into a one-line message on stderr and
an exit code: 0 success, 1 a task or row failed, 2 a usage or configuration problem,
130 interrupted. Credentials are read from the environment only and scrubbed from
every message printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import click

from kling_async._cli._options import ClientOptions
from kling_async._client import KlingClient
from kling_async._config import DEFAULT_BASE_URL
from kling_async._models import PollPolicy
from kling_async.errors import (
    AuthenticationError,
    ConfigurationError,
    KlingError,
    ValidationError,
)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: The environment variables credentials come from (never from options: shell history).
CREDENTIAL_VARIABLES: Final = ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY")

#: Timing of the built-in simulator's tasks: a few seconds each, like a quick real task.
SIMULATOR_SUBMIT_TIME: Final = 0.5
SIMULATOR_PROCESSING_TIME: Final = 2.5
#: Each task's times vary by up to this fraction either way, as Kling's do.
SIMULATOR_TIME_SPREAD: Final = 0.8
#: How often the built-in simulator's tasks are polled (unless --poll-interval).
SIMULATOR_POLL: Final = PollPolicy(initial=0.5, factor=1.3, max_interval=1.5)
#: The built-in simulator's account: one pack, drawn down by a unit per task.
SIMULATOR_PACK_UNITS: Final = 1000.0

_NO_CREDENTIALS: Final = (
    "no credentials: set KLING_API_KEY (a gateway's key), or KLING_ACCESS_KEY and "
    "KLING_SECRET_KEY (the official API); or add --simulate to try the built-in simulator"
)


class CommandError(Exception):
    """A failure the command reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def poll_policy(options: ClientOptions) -> PollPolicy | None:
    """A fixed-interval poll policy when ``--poll-interval`` was given."""
    if options.poll_interval is None:
        return None
    return PollPolicy(
        initial=options.poll_interval,
        factor=1.0,
        max_interval=options.poll_interval,
        jitter=0.0,
    )


def has_credentials() -> bool:
    """Whether the environment holds credentials (even an incomplete pair)."""
    return any(os.environ.get(name) for name in CREDENTIAL_VARIABLES)


def use_simulator(options: ClientOptions) -> bool:
    """Decide the backend, and say on stderr which one ``--simulate`` chose.

    Raises:
        click.UsageError: ``--base-url`` together with ``--simulate``.
        CommandError: no credentials, and no simulator asked for (exit 2).
    """
    if options.simulate == "always":
        if options.base_url is not None:
            raise click.UsageError("--base-url cannot be used with --simulate")
        notice("using the built-in simulator (nothing is sent to Kling)")
        return True
    credentials = has_credentials()
    if options.simulate == "auto":
        if not credentials:
            notice(
                "no credentials in the environment (KLING_API_KEY, or KLING_ACCESS_KEY and "
                "KLING_SECRET_KEY): using the built-in simulator (nothing is sent to Kling)"
            )
            return True
        url = options.base_url or os.environ.get("KLING_BASE_URL") or DEFAULT_BASE_URL
        notice(f"credentials found in the environment: using the API at {url}")
    if not credentials:
        raise CommandError(_NO_CREDENTIALS, EXIT_USAGE)
    return False


@contextlib.asynccontextmanager
async def open_client(
    options: ClientOptions,
    *,
    simulated: bool,
    simulator_state: Path | None = None,
) -> AsyncIterator[KlingClient]:
    """A `KlingClient` for the real API, or for a simulator served while it is open.

    Args:
        options: the command's client options.
        simulated: serve a simulator in-process and talk to it.
        simulator_state: where the simulator keeps its tasks across runs, if anywhere.
    """
    settings: dict[str, Any] = {
        "max_in_flight": options.max_in_flight,
        "timeout": options.request_timeout,
        "poll": poll_policy(options),
    }
    if not simulated:
        async with KlingClient(
            base_url=options.base_url, allow_insecure=options.allow_insecure, **settings
        ) as client:
            yield client
        return
    from kling_async.testing import SimPack, Simulator  # aiohttp.web: only when needed

    if options.poll_interval is None:
        # The simulator's tasks take seconds, not minutes: look as often as it is worth.
        settings["poll"] = SIMULATOR_POLL

    simulator = Simulator(
        # A throwaway key: real credentials in the environment never reach the simulator.
        api_key=secrets.token_urlsafe(16),
        access_key=None,
        secret_key=None,
        submit_time=SIMULATOR_SUBMIT_TIME,
        processing_time=SIMULATOR_PROCESSING_TIME,
        time_spread=SIMULATOR_TIME_SPREAD,
        state_path=simulator_state,
        resource_packs=[SimPack(name="Simulated pack", total=SIMULATOR_PACK_UNITS)],
    )
    async with (
        simulator,
        KlingClient(api_key=simulator.api_key, base_url=simulator.base_url, **settings) as client,
    ):
        _SIMULATED.add(id(client))
        try:
            yield client
        finally:
            _SIMULATED.discard(id(client))


#: The clients `open_client` made for a built-in simulator (by id, while they are open).
_SIMULATED: set[int] = set()


def simulated(client: KlingClient) -> bool:
    """Whether `client` talks to a built-in simulator that ends with the command."""
    return id(client) in _SIMULATED


def run_with_client(
    options: ClientOptions,
    body: Callable[[KlingClient], Awaitable[int]],
    *,
    simulator_state: Path | None = None,
) -> int:
    """Run `body` with a client for the chosen backend; return the exit code.

    `simulator_state` is passed on to `open_client`.
    """
    try:
        simulated = use_simulator(options)
    except CommandError as error:
        report(str(error))
        return error.exit_code

    async def main() -> int:
        async with open_client(
            options,
            simulated=simulated,
            simulator_state=simulator_state,
        ) as client:
            return await body(client)

    return run_async(main)


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """`asyncio.run` the coroutine `main` makes, mapping what it raises to an exit code."""
    try:
        return asyncio.run(main())
    except CommandError as error:
        report(str(error))
        return error.exit_code
    except (ConfigurationError, ValidationError) as error:
        report(str(error))
        return EXIT_USAGE
    except AuthenticationError as error:
        report(f"{error} (check KLING_API_KEY, or KLING_ACCESS_KEY and KLING_SECRET_KEY)")
        return EXIT_USAGE
    except KlingError as error:
        report(str(error))
        return EXIT_FAILED
    except FileExistsError as error:
        report(f"{error.filename} exists: pass --overwrite to replace it")
        return EXIT_USAGE
    except BrokenPipeError:
        raise  # the reader went away: `main` exits quietly
    except OSError as error:
        report(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED


def redact(text: str) -> str:
    """`text` with any credential from the environment replaced by ``***``."""
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def report(message: str) -> None:
    """Print an error as one line on stderr (credentials scrubbed)."""
    click.echo(f"Error: {redact(message)}", err=True)


def notice(message: str) -> None:
    """Print an informational line on stderr."""
    click.echo(f"kling-async: {redact(message)}", err=True)
