"""Worker processes that share one `RedisAccount` (tests/redis_worker.py), for the Redis
scenario and fault tests: started with a config, read line by line, always reaped."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kling_async.testing import Simulator

WORKER = str(Path(__file__).with_name("redis_worker.py"))


class Worker:
    """One worker process: each line it prints is one job's JSON outcome."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""

    async def read_until(self, count: int) -> None:
        assert self.process.stdout is not None
        while len(self.lines) < count:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            assert line, f"worker ended early: {self.lines}"
            self.lines.append(json.loads(line))

    async def finish(self) -> list[dict[str, Any]]:
        out, err = await asyncio.wait_for(self.process.communicate(), 90)
        self.lines += [json.loads(line) for line in out.decode().splitlines() if line]
        self.stderr = err.decode()  # the account's warnings, shown when one fails
        assert self.process.returncode == 0, self.stderr[-4000:]
        return self.lines


_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def reap_workers() -> AsyncIterator[None]:
    """Kill and reap every worker a test started (import it into the test module)."""
    yield
    while _started:
        process = _started.pop()
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def start_worker(
    sim: Simulator,
    redis_url: str,
    name: str,
    items: list[tuple[str, str]],
    *,
    max_running: int | None = 3,
    lease: float = 1.0,
    **config: Any,
) -> Worker:
    """Start a worker on account `name` that extends `items` ((external id, video id));
    `config` adds tests/redis_worker.py's other settings (hold, linger, timeout, ...)."""
    config.update(
        redis=redis_url,
        name=name,
        base_url=sim.base_url,
        api_key=sim.api_key,
        max_running=max_running,
        lease=lease,
        items=items,
        debug=bool(os.environ.get("KLING_TEST_WORKER_DEBUG")),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        WORKER,
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )
    _started.append(process)
    return Worker(process)


def _pythonpath() -> str:
    # The repository first; then whatever the tests run with (another redis-py, say).
    return os.pathsep.join(
        filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])
    )


def items(worker: int, count: int) -> list[tuple[str, str]]:
    """`count` jobs of worker number `worker`, each with its own external id."""
    return [(f"w{worker}-{i}", f"video-{worker}-{i}") for i in range(count)]
