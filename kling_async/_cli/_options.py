"""The options the commands share, and the choices they offer: click alone, nothing more.

``kling-async --help``, a command's ``--help`` and a usage error need only the commands'
declarations, so this module and the modules declaring the commands import click and
nothing heavy (no aiohttp, rich, attrs or the batch runner); what runs a command is
imported when it runs. `tests/test_package.py` holds them to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

import click

from kling_async._config import DEFAULT_BASE_URL

SIMULATE_MODES: Final = ("always", "auto", "never")
#: Batch input formats (`kling_async._cli._rows_in` reads them).
FORMATS: Final = ("jsonl", "csv")
#: How a batch names a saved video (``--name-by``).
NAMINGS: Final = ("row", "video", "external-id")
#: Kling's page limits (`kling_async._client` has the same numbers; a test keeps them so),
#: written here so that ``--help`` does not load the HTTP client.
MAX_PAGE: Final = 1000
MAX_PAGE_SIZE: Final = 500


class ClientOptions(NamedTuple):
    """The options every command but ``simulate`` takes."""

    simulate: str = "never"
    base_url: str | None = None
    max_in_flight: int = 8
    request_timeout: float = 60.0
    poll_interval: float | None = None
    allow_insecure: bool = False


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


def version_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--version``, reading the package's version only when it is asked for."""

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        from kling_async import __version__

        click.echo(f"kling-async, version {__version__}")
        ctx.exit()

    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=show,
        help="Show the version and exit.",
    )
