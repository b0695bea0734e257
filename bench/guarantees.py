"""What exactly-once costs on the success path: requests and client CPU per create.

Creates with the client's own UUID ids against creates with caller-given ids (which are
looked up before their first POST: a job may have run before), both through `extend`,
against the simulator in its own process. The simulator counts the requests; the client's
CPU is `time.process_time` in this process. Part of ``nox -s bench`` (``--only
guarantees``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from server import simulator_process

from kling_async import ExtendRequest, KlingClient
from kling_async.testing import Simulator


async def _cpu(base_url: str, api_key: str, n: int, given: bool) -> float:
    async with KlingClient(api_key=api_key, base_url=base_url) as kling:
        tag = uuid.uuid4().hex[:8]
        await kling.extend(ExtendRequest("1", "warm up"))
        started = time.process_time()
        for i in range(n):
            ext = f"job-{tag}-{i}" if given else None
            await kling.extend(ExtendRequest(str(i + 1), "p", external_task_id=ext))
        return (time.process_time() - started) * 1e6 / n


async def _requests(n: int, given: bool) -> tuple[float, float]:
    # Counted by an in-process simulator (its counters), apart from the timed runs.
    async with (
        Simulator(submit_time=30, processing_time=30) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling,
    ):
        for i in range(n):
            ext = f"job-{i}" if given else None
            await kling.extend(ExtendRequest(str(i + 1), "p", external_task_id=ext))
        return sim.counters.creates / n, sim.counters.gets / n


def run(rounds: int, n: int = 500) -> list[str]:
    """One line per kind of id: µs of client CPU per create and the requests it sent."""
    lines = []
    for given in (False, True):
        cpus = []
        for _ in range(rounds):
            with simulator_process(submit_time=30, processing_time=30) as (base_url, api_key):
                cpus.append(asyncio.run(_cpu(base_url, api_key, n, given)))
        posts, gets = asyncio.run(_requests(100, given))
        kind = "a caller-given external_task_id" if given else "the client's own UUID id"
        lines.append(
            f"extend with {kind}: {statistics.median(cpus):.0f} µs client CPU per create;"
            f" {posts:.2f} POST and {gets:.2f} GET per create (median of {rounds} x {n})"
        )
    return lines
