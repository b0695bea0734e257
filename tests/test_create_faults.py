"""Exactly once and within the plan when creates meet faults (issue: "under every fault").

Each test drives the public client against the simulator over real sockets and asserts
what the service saw: tasks per external id, and the most tasks running at once.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator

import pytest

import kling_async._account
from kling_async import (
    APIConnectionError,
    ExtendRequest,
    InMemoryAccount,
    KlingClient,
    KlingError,
    RateLimitError,
    ServerError,
)
from kling_async.testing import Simulator, set_testing
from tests.conftest import FAST_POLL

VIDEO = "828006748715380777"


def request(external_id: str | None = None) -> ExtendRequest:
    return ExtendRequest(VIDEO, "extend it", external_task_id=external_id)


def posts(sim: Simulator) -> list[float]:
    return [r.received_at for r in sim.recent_requests if r.method == "POST"]


@pytest.fixture
def settle() -> Iterator[None]:
    """A settle time long enough for the queueing gateways below (3 s holds)."""
    set_testing(True, absence_settle=5.0)
    yield
    set_testing(True)


def client(sim: Simulator, **options: object) -> KlingClient:
    options.setdefault("timeout", 5.0)
    return KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_account", [False, True])
async def test_a_job_run_again_after_an_ambiguous_create_finds_the_first_task(
    sim: Simulator, with_account: bool
) -> None:
    """The first run's create reached the service (the answer was lost) and every
    look-up failed, so it raised; the job queue runs it again: still one task."""
    account = InMemoryAccount(max_running=2) if with_account else None
    sim.inject("drop_after", on="create")
    sim.inject("500", on="get", times=50)
    async with client(sim, max_retries=2, account=account) as kling:
        with pytest.raises(KlingError):
            await kling.extend(request("job-1"))
        sim.clear_faults()
        again = await kling.extend(request("job-1"))  # the queue's second run
    assert sim.counters.creates_by_external_id == {"job-1": 1}
    assert again.task_id == sim.task_by_external_id("job-1").task_id  # type: ignore[union-attr]


async def test_a_job_run_again_in_another_client_finds_the_task_of_a_lost_answer(
    sim: Simulator,
) -> None:
    sim.inject("drop_after", on="create")
    sim.inject("503", on="get", times=50)
    async with client(sim, max_retries=1) as first:
        with pytest.raises(KlingError):
            await first.extend(request("job-2"))
    sim.clear_faults()
    async with client(sim) as second:  # a new client, as a re-run worker would make
        await second.extend(request("job-2"))
    assert sim.counters.creates_by_external_id == {"job-2": 1}


async def test_an_accepted_create_with_no_task_in_its_answer_keeps_its_slot_and_is_looked_up(
    sim: Simulator,
) -> None:
    sim.processing_time = 30.0
    account = InMemoryAccount(max_running=1)
    sim.inject("empty_data", on="create")
    async with client(sim, account=account, timeout=1.0) as kling:
        task = await kling.extend(request("empty-1"))
        assert task.task_id == sim.task_by_external_id("empty-1").task_id  # type: ignore[union-attr]
        assert account.running == 1
        # The slot is the task's: a second create waits for it instead of running.
        with pytest.raises((APIConnectionError, RateLimitError)):
            await asyncio.wait_for(kling.extend(request("empty-2")), 30)
    assert sim.counters.tasks_created == 1 and sim.counters.peak_running_tasks == 1


async def test_an_accepted_create_whose_look_ups_fail_is_never_posted_again(
    sim: Simulator,
) -> None:
    sim.processing_time = 30.0
    account = InMemoryAccount(max_running=1)
    sim.inject("empty_data", on="create")
    sim.inject("500", on="get", times=50)
    async with client(sim, max_retries=2, account=account) as kling:
        with pytest.raises(KlingError):
            await kling.extend(request())  # the client's own id: no look-up first
        assert account.running == 1  # the task exists: its slot stays taken
    assert sim.counters.creates == 1 and sim.counters.tasks_created == 1


async def test_a_gateway_that_delivers_a_create_after_our_timeout_gets_no_second_task(
    sim: Simulator, settle: None
) -> None:
    """The gateway holds the POST 3 s after the client gave up at 1 s; a look-up in
    between truthfully answers 1203. "Absent" is believed only once the held request
    can no longer arrive."""
    sim.inject("hold", on="create", delay=3.0)
    async with client(sim, timeout=1.0) as kling:
        task = await kling.extend(request())
    assert sim.counters.tasks_created == 1 and not sim.counters.duplicate_external_ids
    assert task.task_id == next(iter(sim.tasks))


async def test_the_services_duplicate_refusal_answers_with_the_existing_task(
    sim: Simulator,
) -> None:
    """With the service refusing a taken external id (400/1201), a second POST of one
    id (the settle time was too short for the gateway) returns the first task."""
    sim.refuse_duplicate_external_ids = True
    sim.inject("hold", on="create", delay=1.5)
    async with client(sim, timeout=0.5) as kling:
        task = await kling.extend(request("held-1"))
    await asyncio.sleep(0)  # the held request may still be processed after us
    for _ in range(600):  # up to 30 s: a bound only a hang reaches
        if sim.counters.creates >= 2 and not sim.pending_faults:
            break
        await asyncio.sleep(0.05)
    assert sim.counters.creates_by_external_id == {"held-1": 1}
    assert task.task_id == sim.task_by_external_id("held-1").task_id  # type: ignore[union-attr]


async def test_a_refused_duplicate_id_is_looked_up_not_failed(sim: Simulator) -> None:
    sim.refuse_duplicate_external_ids = True
    async with client(sim) as kling:
        first = await kling.extend(request("dup-1"))
        # A create that skips the look-up (as a fresh journal's items do) and meets a
        # taken id: the service refuses it, and the client answers with that task.
        again = await kling._tasks.create(request("dup-1"), look_up_first=False)
    assert again.task_id == first.task_id
    assert sim.counters.rejected_duplicates == 1 and sim.counters.tasks_created == 1


@pytest.mark.parametrize("with_account", [False, True])
async def test_one_external_id_extended_at_once_by_many_coroutines_creates_one_task(
    sim: Simulator, with_account: bool
) -> None:
    account = InMemoryAccount() if with_account else None
    async with client(sim, account=account) as kling, client(sim, account=account) as other:
        tasks = await asyncio.gather(
            *((kling if i % 2 else other).extend(request("same-id")) for i in range(20))
        )
    assert {task.task_id for task in tasks} == {sim.task_by_external_id("same-id").task_id}  # type: ignore[union-attr]
    assert sim.counters.creates == 1


async def test_the_coroutines_waiting_on_a_failed_create_share_its_error(
    sim: Simulator,
) -> None:
    sim.inject("503", on="create", times=100)
    async with client(sim, max_retries=0) as kling:
        outcomes = await asyncio.gather(
            *(kling.extend(request("fails")) for _ in range(5)), return_exceptions=True
        )
    assert all(isinstance(outcome, ServerError) for outcome in outcomes)
    assert sim.counters.creates == 1


async def test_a_slot_is_not_freed_under_a_create_that_waits_out_a_long_retry_after(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The account's own check looks up slots nobody reported for a while; it must not
    look up (and free) one whose create is still under way."""
    monkeypatch.setattr(kling_async._account, "CHECK_AFTER", 0.2)
    sim.processing_time = 30.0
    account = InMemoryAccount(max_running=1)
    sim.inject("429", on="create", retry_after=2.0)
    async with client(sim, account=account, timeout=2.0) as kling:
        first = asyncio.ensure_future(kling.extend(request("slow-1")))
        second = asyncio.ensure_future(kling.extend(request("slow-2")))
        await asyncio.wait_for(first, 30)
        # The second create waits for the slot that the first task holds.
        with pytest.raises((APIConnectionError, RateLimitError)):
            await asyncio.wait_for(second, 30)
    assert sim.counters.tasks_created == 1 and sim.counters.peak_running_tasks == 1


@pytest.mark.parametrize("with_account", [False, True])
async def test_429_answers_space_posts_a_second_apart_and_end(
    sim: Simulator, with_account: bool
) -> None:
    """A Retry-After of 0.01 s is not an invitation to 80 POSTs a second."""
    account = InMemoryAccount(max_running=2) if with_account else None
    sim.inject("429", on="create", times=1000, retry_after=0.01)
    async with client(sim, max_retries=3, timeout=3.0, account=account) as kling:
        with pytest.raises(RateLimitError):
            await asyncio.wait_for(kling.extend(request()), 60)
    times = posts(sim)
    assert len(times) == 4  # the first try and max_retries more
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(times))


async def test_a_create_refused_1303_past_its_slot_time_ends_in_rate_limit_error(
    sim: Simulator,
) -> None:
    sim.running_limit = 1
    sim.processing_time = 60.0
    async with client(sim) as filler:
        await filler.extend(request())  # someone else's task fills the account
    account = InMemoryAccount()
    async with client(sim, timeout=2.0, account=account) as kling:
        with pytest.raises(RateLimitError) as caught:
            await asyncio.wait_for(kling.extend(request()), 60)
    assert caught.value.code == 1303
    times = posts(sim)[1:]
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_storm_of_create_faults_bills_each_item_once_within_the_plan(seed: int) -> None:
    """Every fault a create can meet at once, queueing gateways included, on a 3-slot
    account; then the same jobs run again (a queue's redelivery): nothing new."""
    set_testing(True, absence_settle=1.0)  # longer than the gateways hold a request
    kinds = ["500", "503", "drop_before", "drop_after", "html", "truncated", "hold", "empty_data"]
    try:
        async with Simulator(
            submit_time=0.01, processing_time=0.1, running_limit=3, seed=seed
        ) as sim:
            sim.set_fault_rate(0.3, on="create", kinds=kinds, delay=0.4)
            sim.set_fault_rate(0.2, on="get", kinds=["500", "drop_after", "empty_data"])
            jobs = [request(f"storm-{seed}-{i}") for i in range(30)]
            account = InMemoryAccount(max_running=3)
            async with client(sim, timeout=0.25, max_retries=12, account=account) as kling:
                first = [r async for r in kling.extend_many(jobs, concurrency=10)]
                again = [r async for r in kling.extend_many(jobs, wait=False)]
            assert [r.error for r in first + again if not r.ok] == []
            assert sim.counters.creates_by_external_id == {job.external_task_id: 1 for job in jobs}
            assert sim.counters.peak_running_tasks <= 3
            assert {r.task.task_id for r in again if r.task} == {
                r.task.task_id for r in first if r.task
            }
    finally:
        set_testing(True)


async def test_waiting_on_a_create_answer_that_already_says_succeed_returns_the_videos() -> None:
    # A create's answer carries no result: its "succeed" is not the end of the wait.
    async with Simulator(submit_time=0, processing_time=0) as sim, client(sim) as kling:
        task = await kling.extend(request())
        done = await kling.wait_for_task(task)
    assert done.succeeded and done.videos


def test_every_public_wait_defaults_to_the_one_wait_timeout() -> None:
    import inspect

    from kling_async import SyncKlingClient
    from kling_async._models import WAIT_TIMEOUT

    for method in (
        KlingClient.wait_for_task,
        KlingClient.extend_and_wait,
        SyncKlingClient.wait_for_task,
        SyncKlingClient.extend_and_wait,
    ):
        assert inspect.signature(method).parameters["timeout"].default == WAIT_TIMEOUT, method


async def test_a_job_run_again_through_a_redis_account_finds_the_first_task(
    sim: Simulator, redis_url: str
) -> None:
    """As above, with the account in Redis: the first run's ambiguous end is recorded
    with the id's claim, and the run again (here: a new client and account, as another
    worker process would have) looks the id up and returns the first task."""
    from kling_async.redis import RedisAccount

    name = f"rerun-{uuid.uuid4().hex[:8]}"
    sim.inject("drop_after", on="create")
    sim.inject("500", on="get", times=50)
    first_account = RedisAccount(redis_url, name=name, max_running=2, lease=1.0)
    try:
        async with client(sim, max_retries=2, account=first_account) as kling:
            with pytest.raises(KlingError):
                await kling.extend(request("redis-job-1"))
    finally:
        await first_account.aclose()
    sim.clear_faults()
    second_account = RedisAccount(redis_url, name=name, max_running=2, lease=1.0)
    try:
        async with client(sim, account=second_account) as kling:
            again = await kling.extend(request("redis-job-1"))
    finally:
        await second_account.aclose()
    assert sim.counters.creates_by_external_id == {"redis-job-1": 1}
    assert again.task_id == sim.task_by_external_id("redis-job-1").task_id  # type: ignore[union-attr]
