"""`InMemoryAccount` with `KlingClient(account=...)`, against the simulator's running limit."""

from __future__ import annotations

import asyncio

import pytest

from kling_async import (
    ConfigurationError,
    ExtendRequest,
    InMemoryAccount,
    KlingClient,
    PollPolicy,
)
from kling_async._account import Account
from kling_async.testing import Simulator
from tests.conftest import FAST_POLL


def client(sim: Simulator, account: Account | None, **options: object) -> KlingClient:
    options.setdefault("poll", FAST_POLL)
    return KlingClient(
        api_key=sim.api_key,
        base_url=sim.base_url,
        account=account,
        **options,  # type: ignore[arg-type]
    )


def requests(n: int, prefix: str = "v") -> list[ExtendRequest]:
    return [ExtendRequest(video_id=f"{prefix}{i}", prompt="p") for i in range(n)]


async def test_a_given_limit_is_never_exceeded_and_no_1303_is_drawn(sim: Simulator) -> None:
    sim.running_limit = 2
    account = InMemoryAccount(max_running=2)
    async with client(sim, account) as kling:
        done = await asyncio.gather(*(kling.extend_and_wait(r) for r in requests(8)))
    assert all(task.succeeded for task in done)
    assert sim.counters.tasks_created == 8
    assert sim.counters.rejected_1303 == 0
    assert account.running == 0


async def test_two_clients_share_one_account(sim: Simulator) -> None:
    sim.running_limit = 3
    account = InMemoryAccount(max_running=3)
    async with client(sim, account) as one, client(sim, account) as two:
        done = await asyncio.gather(
            *(one.extend_and_wait(r) for r in requests(5, "a")),
            *(two.extend_and_wait(r) for r in requests(5, "b")),
        )
    assert len(done) == 10
    assert sim.counters.rejected_1303 == 0
    assert not sim.counters.duplicate_external_ids


async def test_a_learned_limit_waits_for_slots_instead_of_spending_retries(
    sim: Simulator,
) -> None:
    sim.running_limit = 3
    account = InMemoryAccount()
    assert account.limit == 1  # learning starts small and doubles per round
    async with client(sim, account, max_retries=0) as kling:
        # No retries at all: every 1303 must be absorbed by the account, not retried.
        done = await asyncio.gather(*(kling.extend_and_wait(r) for r in requests(12)))
    assert all(task.succeeded for task in done)
    # (Not the limit's final value: a task that ended at the service before the client
    # saw it lets a create through above the plan's limit, and the estimate grows; how
    # often depends on when the polls run on a busy machine.)
    assert sim.counters.tasks_created == 12
    assert not sim.counters.duplicate_external_ids
    # Learning, not hammering: the slow start ends with one refusal, and then the limit
    # grows by 1/limit per create accepted at it, so at most one more refusal per
    # `limit` (3) creates, however the tasks' ends fall on a busy machine.
    assert sim.counters.rejected_1303 <= 1 + 12 // 3


async def test_a_batch_uses_the_clients_account(sim: Simulator) -> None:
    sim.running_limit = 2
    account = InMemoryAccount(max_running=2)
    async with client(sim, account) as kling:
        results = [r async for r in kling.extend_many(requests(6), concurrency=6)]
    assert all(result.ok for result in results)
    assert sim.counters.rejected_1303 == 0


async def test_the_same_external_id_from_many_calls_creates_one_task(sim: Simulator) -> None:
    account = InMemoryAccount()
    request = ExtendRequest(video_id="v", prompt="p", external_task_id="job-42")
    async with client(sim, account) as kling:
        tasks = await asyncio.gather(*(kling.extend(request) for _ in range(4)))
        again = await kling.extend(request)
    assert {task.task_id for task in tasks} == {again.task_id}
    assert sim.counters.tasks_created == 1
    assert sim.counters.creates == 1  # the others sent nothing


async def test_a_slot_is_freed_when_anyone_sees_the_task_finished(sim: Simulator) -> None:
    account = InMemoryAccount(max_running=1)
    async with client(sim, account) as kling:
        first = await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
        second = asyncio.ensure_future(kling.extend(ExtendRequest(video_id="v2", prompt="p")))
        await asyncio.sleep(0.2)  # the first task finishes in the simulator meanwhile
        assert not second.done()  # nobody has seen it finish: its slot is still taken
        assert (await kling.get_task(first.task_id)).succeeded
        created = await asyncio.wait_for(second, 5)
    assert created.task_id != first.task_id
    assert account.running == 1


async def test_the_account_looks_up_tasks_nobody_watches(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kling_async._account.CHECK_AFTER", 0.1)
    account = InMemoryAccount(max_running=1)
    async with client(sim, account) as kling:
        await kling.extend(ExtendRequest(video_id="v1", prompt="p"))  # never waited on
        second = await asyncio.wait_for(kling.extend(ExtendRequest(video_id="v2", prompt="p")), 10)
    assert second.task_id
    await account.aclose()


async def test_cancelling_a_wait_for_a_slot_leaves_nothing_held(sim: Simulator) -> None:
    account = InMemoryAccount(max_running=1)
    async with client(sim, account) as kling:
        await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
        waiting = asyncio.ensure_future(kling.extend(ExtendRequest(video_id="v2", prompt="p")))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert account.running == 1
    assert sim.counters.tasks_created == 1
    await account.aclose()


async def test_a_slot_wait_counts_against_extend_and_waits_timeout(sim: Simulator) -> None:
    from kling_async import APITimeoutError

    account = InMemoryAccount(max_running=1)
    sim.processing_time = 30.0
    async with client(sim, account) as kling:
        await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
        with pytest.raises(APITimeoutError, match="no running-task slot"):
            await kling.extend_and_wait(ExtendRequest(video_id="v2", prompt="p"), timeout=0.2)
    assert sim.counters.tasks_created == 1
    await account.aclose()


async def test_a_1303_from_tasks_outside_the_account_is_waited_out(sim: Simulator) -> None:
    # The plan allows 3, but someone else runs one task on the account: 1303s come.
    sim.running_limit = 2
    account = InMemoryAccount(max_running=3)
    poll = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)
    async with client(sim, account, poll=poll) as kling:
        done = await asyncio.gather(*(kling.extend_and_wait(r) for r in requests(4)))
    assert len(done) == 4
    assert sim.counters.tasks_created == 4
    assert not sim.counters.duplicate_external_ids


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_max_running_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="max_running"):
        InMemoryAccount(max_running=bad)  # type: ignore[arg-type]


def test_the_client_refuses_an_account_of_another_kind() -> None:
    with pytest.raises(ConfigurationError, match="account"):
        KlingClient(api_key="k", account=object())  # type: ignore[arg-type]
