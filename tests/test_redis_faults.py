"""RedisAccount under faults: a real redis-server the test pauses (SIGSTOP/SIGCONT), kills
and restarts without persistence, real worker processes it SIGKILLs, and the simulator's
counters asserted: tasks per external id and the most tasks running at once.

The simulator enforces no running limit here (``running_limit=None``): only the account
keeps the creates within the plan, so the peak it measures is the account's doing.
Every wait is bounded; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis_workers
from redis_server import RedisServer
from redis_workers import Worker, items, reap_workers  # noqa: F401 - a fixture

from kling_async import APIConnectionError, ExtendRequest, KlingClient, PollPolicy, TaskStatus
from kling_async.redis import RedisAccount
from kling_async.testing import Simulator

POLL = PollPolicy(initial=0.05, factor=1.5, max_interval=0.2)
#: Longer than the workers' lease (1 s) and their claims (3 leases): by Redis's own
#: clock every lease and claim would look lapsed when it answers again.
PAUSE = 4.0

pytestmark = pytest.mark.slow


@pytest.fixture
def name() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(
        submit_time=0.1, processing_time=0.5, running_limit=None, seed=5
    ) as simulator:
        yield simulator


def peak_running(sim: Simulator) -> int:
    """The most tasks running at once (created, not yet finished), from the tasks."""
    events: list[tuple[float, int]] = []
    for task in sim.tasks.values():
        end = task.finishes_at
        if task.forced_at is not None:
            end = min(end, task.forced_at)
        events += [(task.created_at, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return max(peak, getattr(sim.counters, "peak_running_tasks", 0))


def start_worker(
    sim: Simulator, url: str, name: str, jobs: list[tuple[str, str]], **settings: Any
) -> Awaitable[Worker]:
    # Each job is tried as often as a job queue would redeliver it through every pause.
    return redis_workers.start_worker(sim, url, name, jobs, attempts=60, **settings)


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    for _ in range(3000):
        answer = condition()
        if not isinstance(answer, bool):
            answer = await answer
        if answer:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


def all_succeeded(lines: list[dict[str, Any]]) -> bool:
    return all(line.get("status") == "succeed" for line in lines)


async def test_redis_paused_longer_than_a_lease_three_times_mid_batch(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    url = own_redis_server.url
    # Three jobs every worker runs too (a job queue's redelivery): claimed by one,
    # waited on by the others, through the pauses.
    shared = [(f"shared-{i}", f"video-s{i}") for i in range(3)]
    workers = [
        await start_worker(sim, url, name, shared[w:] + items(w, 4) + shared[:w]) for w in range(3)
    ]
    for round_ in range(3):
        await until(lambda r=round_: sim.counters.tasks_created >= 1 + 2 * r, "creates go on")
        own_redis_server.pause()
        try:
            await asyncio.sleep(PAUSE)
        finally:
            own_redis_server.resume()
    lines = [line for worker in workers for line in await worker.finish()]
    assert all_succeeded(lines), lines
    assert len(lines) == 21
    assert sim.counters.tasks_created == 15
    assert not sim.counters.duplicate_external_ids
    assert peak_running(sim) <= 3


async def test_redis_restarted_empty_mid_batch(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    url = own_redis_server.url
    # A lease of 2 s: the guarantee assumes a live worker's own event loop never stalls
    # for a whole lease, and a machine this busy (three workers, Redis, the simulator
    # and the suite beside it on two cores) can stall one for about a second.
    workers = [await start_worker(sim, url, name, items(w, 6), lease=2.0) for w in range(3)]
    await until(lambda: sim.counters.tasks_created >= 3, "the slots are full")
    own_redis_server.restart()
    lines = [line for worker in workers for line in await worker.finish()]
    assert all_succeeded(lines), lines
    counters = sim.counters
    assert counters.tasks_created == 18, counters
    assert not counters.duplicate_external_ids, counters
    assert peak_running(sim) <= 3, counters


async def test_two_limits_on_one_account_the_smallest_applies(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    url = own_redis_server.url
    # The limit of a live process applies: the small one stays open until the end.
    small = await start_worker(sim, url, name, items(0, 6), max_running=2, linger=60)
    await until(lambda: sim.counters.tasks_created >= 1, "the first process runs")
    large = await start_worker(sim, url, name, items(1, 6), max_running=5)
    lines = await large.finish()
    await small.read_until(6)
    small.process.kill()
    _, err = await asyncio.wait_for(small.process.communicate(), 30)
    small.stderr = err.decode()
    lines += small.lines
    assert all_succeeded(lines), lines
    assert sim.counters.tasks_created == 12
    assert peak_running(sim) <= 2
    for worker, own, other in ((small, 2, 5), (large, 5, 2)):
        assert f"given max_running={own}" in worker.stderr, worker.stderr
        assert f"was given max_running={other}" in worker.stderr, worker.stderr


async def test_redis_unresponsive_a_new_create_fails_naming_redis(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    account = RedisAccount(own_redis_server.url, name=name, max_running=2, lease=2.0)
    try:
        async with KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            poll=POLL,
            timeout=1.0,
            account=account,  # type: ignore[call-arg]
        ) as kling:
            await kling.extend(ExtendRequest("video-0", "继续", external_task_id="warm"))
            own_redis_server.pause()
            try:
                for request in (
                    ExtendRequest("video-1", "继续", external_task_id="claimed"),
                    ExtendRequest("video-2", "继续"),
                ):
                    with pytest.raises(APIConnectionError) as caught:
                        await asyncio.wait_for(kling.extend(request), 30)
                    assert f"Redis at 127.0.0.1:{own_redis_server.port}" in str(caught.value)
            finally:
                own_redis_server.resume()
            # Nothing broken is left in the pool: the next create goes through.
            task = await asyncio.wait_for(
                kling.extend(ExtendRequest("video-3", "继续", external_task_id="after")), 30
            )
            assert task.external_task_id == "after"
    finally:
        await account.aclose()
    assert sim.counters.tasks_created == 2
    assert not sim.counters.duplicate_external_ids


async def test_redis_unresponsive_while_a_task_finishes_the_wait_returns_it(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    sim.processing_time = 1.0
    account = RedisAccount(own_redis_server.url, name=name, max_running=2, lease=1.0)
    try:
        async with KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            poll=POLL,
            timeout=2.0,
            account=account,  # type: ignore[call-arg]
        ) as kling:
            waiting = asyncio.ensure_future(
                kling.extend_and_wait(ExtendRequest("video-0", "继续"), timeout=5)
            )
            await until(lambda: sim.counters.tasks_created == 1, "the task created")
            own_redis_server.pause()
            try:
                task = await asyncio.wait_for(waiting, 30)
            finally:
                own_redis_server.resume()
            assert task.status is TaskStatus.SUCCEED
    finally:
        await account.aclose()


async def test_a_worker_killed_mid_create_its_job_rerun_elsewhere_makes_one_task(
    sim: Simulator, own_redis_server: RedisServer, name: str
) -> None:
    url = own_redis_server.url
    job = [("job-1", "video-1")]
    sim.inject("slow", on="create", delay=30.0)  # created at once, answered never
    first = await start_worker(sim, url, name, job, hold=True)
    await until(lambda: sim.counters.tasks_created == 1, "the create reached the service")
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    # The job queue runs the job again elsewhere: it waits out the dead claim, then looks
    # the id up before any create (the claim says an earlier create may have been sent).
    second = await start_worker(sim, url, name, job)
    lines = await second.finish()
    assert all_succeeded(lines), lines
    assert sim.counters.tasks_created == 1
    assert sim.counters.creates_by_external_id == {"job-1": 1}
