"""Shared fixtures: a simulator on 127.0.0.1 and a client pointed at it."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from kling_async import KlingClient, PollPolicy
from kling_async.testing import Simulator, set_testing
from tests.callback_receiver import Receiver, serve_receiver

# A busy machine is slow, not wrong: no per-example deadline (every property still runs
# all its examples; a real hang is caught by pytest-timeout).
settings.register_profile("kling", deadline=None)
settings.load_profile("kling")

pytest_plugins = ["kling_async.testing.pytest_plugin", "redis_server"]


def pytest_configure(config: pytest.Config) -> None:
    # As from a terminal. A suite started in the background by a non-interactive shell
    # (as ../shared/tools/suite-under-load is) inherits SIGINT *ignored*, and so would
    # every program a test starts: the Ctrl-C a test sends would never arrive. A handler,
    # unlike "ignored", is reset to the default when a child program starts.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: Polls fast enough that tests spend their time on behaviour, not on waiting.
FAST_POLL = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)


@pytest.fixture(autouse=True)
def _testing_mode() -> None:
    # Short settle after ambiguous failures; tests of the settle itself set their own.
    set_testing(True)


@pytest.fixture(autouse=True)
def _no_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "KLING_API_KEY",
        "KLING_ACCESS_KEY",
        "KLING_SECRET_KEY",
        "KLING_BASE_URL",
        "KLING_WEBHOOK_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(submit_time=0.02, processing_time=0.05, seed=7) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[KlingClient]:
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, timeout=5.0
    ) as kling:
        yield kling


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    return caplog


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """An endpoint on 127.0.0.1 recording the callbacks sent to it, and its URL."""
    async with serve_receiver() as served:
        yield served
