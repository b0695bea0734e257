"""What every CLI command shares: client options, the built-in simulator, exit codes.

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
import functools
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import click

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
SIMULATE_MODES: Final = ("always", "auto", "never")

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


@attrs.frozen
class ClientOptions:
    """The options every command but ``simulate`` takes."""

    simulate: str = "never"
    base_url: str | None = None
    max_in_flight: int = 8
    request_timeout: float = 60.0
    poll_interval: float | None = None
    allow_insecure: bool = False

    def poll_policy(self) -> PollPolicy | None:
        """A fixed-interval poll policy when ``--poll-interval`` was given."""
        if self.poll_interval is None:
            return None
        return PollPolicy(
            initial=self.poll_interval, factor=1.0, max_interval=self.poll_interval, jitter=0.0
        )


class CliCommand(click.Command):
    """A command whose bare ``--simulate`` never swallows the argument after it.

    ``--simulate`` takes an optional value; click would read ``batch --simulate rows.csv``
    as ``--simulate=rows.csv``. A bare ``--simulate`` not followed by a mode is
    rewritten to ``--simulate=always`` before click parses the arguments.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Expand a bare ``--simulate``, then parse as usual."""
        return super().parse_args(ctx, expand_bare_simulate(args))


def expand_bare_simulate(args: Sequence[str]) -> list[str]:
    """``--simulate`` not followed by a mode becomes ``--simulate=always`` (up to ``--``)."""
    expanded: list[str] = []
    for position, arg in enumerate(args):
        if arg == "--":
            expanded.extend(args[position:])
            break
        following = args[position + 1] if position + 1 < len(args) else None
        if arg == "--simulate" and following not in SIMULATE_MODES:
            expanded.append("--simulate=always")
        else:
            expanded.append(arg)
    return expanded


def client_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the shared client options to a command; it receives them as ``client=``."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        simulate: str,
        base_url: str | None,
        max_in_flight: int,
        request_timeout: float,
        poll_interval: float | None,
        allow_insecure: bool,
        **kwargs: Any,
    ) -> None:
        options = ClientOptions(
            simulate=simulate,
            base_url=base_url,
            max_in_flight=max_in_flight,
            request_timeout=request_timeout,
            poll_interval=poll_interval,
            allow_insecure=allow_insecure,
        )
        command(*args, client=options, **kwargs)

    decorators = (
        click.option(
            "--simulate",
            type=click.Choice(SIMULATE_MODES),
            default="never",
            is_flag=False,
            flag_value="always",
            show_default=True,
            help="Run against a built-in simulator instead of Kling. Bare --simulate means "
            "always; --simulate=auto simulates only when no credentials are set (write the "
            "mode after '='). Each run starts a fresh simulator, so it suits extend --wait "
            "and batch; for a lasting one see `kling-async simulate`.",
        ),
        click.option(
            "--base-url",
            metavar="URL",
            help="API root, with a gateway's /kling prefix if it has one "
            f"[default: $KLING_BASE_URL, else {DEFAULT_BASE_URL}].",
        ),
        click.option(
            "--allow-insecure",
            is_flag=True,
            help="Allow a plain http:// --base-url to a host that is not this machine "
            "(the key then crosses the network in clear text).",
        ),
        click.option(
            "--max-in-flight",
            type=click.IntRange(min=1),
            default=8,
            metavar="N",
            show_default=True,
            help="Most HTTP requests open at once (polls and retries included).",
        ),
        click.option(
            "--request-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=60.0,
            show_default=True,
            metavar="SECONDS",
            help="Time limit of one HTTP request.",
        ),
        click.option(
            "--poll-interval",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Poll tasks every SECONDS (for testing; by default polls start after "
            "2 s and grow to 15 s apart).",
        ),
    )
    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


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
        "poll": options.poll_policy(),
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
