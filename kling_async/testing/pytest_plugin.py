"""Opt-in pytest fixtures: `pytest_plugins = ["kling_async.testing.pytest_plugin"]`.

- `kling_simulator`: a started `Simulator` running in its own thread (works for sync
  tests and under any async plugin), closed after the test. Configure it per test with
  `@pytest.mark.kling_simulator(processing_time=0.5, running_limit=2, ...)` (keyword
  arguments of `Simulator`).
- `kling_env`: the same simulator, with `KLING_BASE_URL` and `KLING_API_KEY` set to it
  and `KLING_ACCESS_KEY`/`KLING_SECRET_KEY` removed, so `KlingClient()` talks to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._simulator import Simulator

__all__ = ["kling_env", "kling_simulator", "pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the `kling_simulator` marker."""
    config.addinivalue_line(
        "markers",
        "kling_simulator(**kwargs): keyword arguments for the kling_simulator fixture's Simulator",
    )


@pytest.fixture
def kling_simulator(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    """A started `Simulator` on its own thread, closed after the test."""
    marker = request.node.get_closest_marker("kling_simulator")
    options = dict(marker.kwargs) if marker is not None else {}
    with Simulator(**options).run_in_thread() as simulator:
        yield simulator


@pytest.fixture
def kling_env(kling_simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """`kling_simulator`, with the `KLING_*` environment variables pointing at it."""
    monkeypatch.setenv("KLING_BASE_URL", kling_simulator.base_url)
    if kling_simulator.api_key is not None:
        monkeypatch.setenv("KLING_API_KEY", kling_simulator.api_key)
    else:
        monkeypatch.delenv("KLING_API_KEY", raising=False)
    monkeypatch.delenv("KLING_ACCESS_KEY", raising=False)
    monkeypatch.delenv("KLING_SECRET_KEY", raising=False)
    return kling_simulator
