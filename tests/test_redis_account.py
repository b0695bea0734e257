"""RedisAccount against a real redis-server: two account objects sharing a name play two
processes (the multi-process scenarios with the simulator are in test_redis_scenarios)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
import redis.asyncio as aioredis
from redis_server import RedisServer

from kling_async import APIConnectionError, ConfigurationError, Task, TaskStatus
from kling_async._account import Claim
from kling_async.redis import RedisAccount


def running(task_id: str, ext: str = "") -> Task:
    return Task(task_id, TaskStatus.PROCESSING, external_task_id=ext or None)


def done(task_id: str, ext: str = "") -> Task:
    # A task seen finished by a poll carries its external id: how another process's
    # `finished` finds the slot (the create wrote nothing more than its take).
    return Task(task_id, TaskStatus.SUCCEED, external_task_id=ext or None)


async def nobody(_: str) -> Task | None:
    return None


@pytest.fixture
def name(redis_url: str) -> str:
    """A fresh account name, already in use (its first use has a test of its own)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    seed(redis_url, name)
    return name


def seed(redis_url: str, name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(f"kling:{{{name}}}:epoch", "seeded")
    finally:
        client.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def accounts(redis_url: str, name: str) -> AsyncIterator[Callable[..., RedisAccount]]:
    made: list[RedisAccount] = []

    def make(**options: object) -> RedisAccount:
        account = RedisAccount(redis_url, name=name, **options)  # type: ignore[arg-type]
        made.append(account)
        return account

    yield make
    for account in made:
        await account.aclose()


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (bounded) for a state, looking every few milliseconds."""
    for _ in range(1000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


async def test_concurrent_acquires_from_two_processes_never_pass_the_limit(
    accounts: Callable[..., RedisAccount],
) -> None:
    one, two = accounts(max_running=3), accounts(max_running=3)
    holding = peak = 0

    async def create(index: int) -> None:
        nonlocal holding, peak
        account = (one, two)[index % 2]
        slot = await account.acquire(f"ext-{index}", nobody)
        holding += 1
        peak = max(peak, holding)
        await account.created(slot, running(f"task-{index}", f"ext-{index}"))
        await asyncio.sleep(0.005)
        holding -= 1
        # Seen by the other: it finds the slot by the task's external id.
        await (two, one)[index % 2].finished(done(f"task-{index}", f"ext-{index}"))

    await asyncio.gather(*(create(i) for i in range(30)))
    assert peak == 3


async def test_waiters_are_served_first_come_first_served_across_processes(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    one, two = accounts(max_running=1), accounts(max_running=1)
    first = await one.acquire("first", nobody)
    order: list[int] = []

    async def wait_turn(index: int) -> None:
        account = (one, two)[index % 2]
        slot = await account.acquire(f"ext-{index}", nobody)
        order.append(index)
        await account.release(slot)

    waiting = []
    for index in range(6):
        waiting.append(asyncio.ensure_future(wait_turn(index)))

        async def queued(count: int = index + 1) -> bool:
            return await raw.zcard(f"kling:{{{name}}}:queue") == count

        await until(queued, f"{index + 1} waiters queued")
    await one.release(first)
    await asyncio.gather(*waiting)
    assert order == list(range(6))


async def test_many_waiters_of_one_process_are_served_in_call_order(
    accounts: Callable[..., RedisAccount],
) -> None:
    # Their first takes race to Redis over several connections; if Redis queued them in
    # another order than the process's own, the local head would wait behind a waiter
    # that never tries again (only the head does), and they would all hang.
    account = accounts(max_running=1)
    holder = await account.acquire("holder", nobody)
    order: list[int] = []

    async def wait_turn(index: int) -> None:
        slot = await account.acquire(f"ext-{index}", nobody)
        order.append(index)
        await account.release(slot)

    waiting = [asyncio.ensure_future(wait_turn(index)) for index in range(20)]
    await asyncio.sleep(0.05)
    await account.release(holder)
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert order == list(range(20))


async def test_a_waiter_wakes_when_a_slot_frees_not_at_its_next_check(
    accounts: Callable[..., RedisAccount],
) -> None:
    # A 600 s lease puts the safety re-check 200 s away: only the pub/sub wake-up can
    # hand the slot over within the test's few seconds.
    one, two = accounts(max_running=1, lease=600), accounts(max_running=1, lease=600)
    slot = await one.acquire("holder", nobody)
    await one.created(slot, running("task-1"))
    waiter = asyncio.ensure_future(two.acquire("waiter", nobody))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await one.finished(done("task-1"))
    taken = await asyncio.wait_for(waiter, 10)
    assert taken.external_task_id == "waiter"


async def test_the_learned_limit_starts_at_one_and_doubles_across_processes(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    one, two = accounts(), accounts()
    assert (one.limit, two.limit) == (1, 1)
    first = await one.acquire("ext-0", nobody)
    waiter = asyncio.ensure_future(two.acquire("ext-1", nobody))

    async def queued() -> bool:
        return await raw.zcard(f"kling:{{{name}}}:queue") == 1

    await until(queued, "the other process waits at the starting limit of 1")
    await one.created(first, running("task-0"))  # accepted at the limit: one slot more
    assert await raw.get(f"kling:{{{name}}}:limit") == "2"
    assert one.limit == 2
    second = await asyncio.wait_for(waiter, 10)  # woken by the growth, not a free slot
    await two.created(second, running("task-1"))
    third = await one.acquire("ext-2", nobody)
    await one.created(third, running("task-2"))
    assert await raw.get(f"kling:{{{name}}}:limit") == "4"  # 1, 2, 3, 4: +1 per create
    assert two.limit == 3  # what it last saw
    assert await raw.hlen(f"kling:{{{name}}}:leases") == 3


async def test_the_limit_is_learned_from_1303_by_every_process(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    one, two = accounts(), accounts()
    slots = []
    for index in range(4):  # slow start: 1, 2, 3, 4
        slots.append(await one.acquire(f"ext-{index}", nobody))
        if index < 3:
            await one.created(slots[-1], running(f"task-{index}"))
    refusing = asyncio.ensure_future(one.refused(slots[3]))

    async def lowered() -> bool:
        return await raw.get(f"kling:{{{name}}}:limit") == "3"  # 4 held, less the refused one

    await until(lowered, "the limit lowered at once")
    assert await raw.exists(f"kling:{{{name}}}:steady")  # slow start is over

    waiter = asyncio.ensure_future(two.acquire("other process", nobody))

    async def queued() -> bool:
        return await raw.zcard(f"kling:{{{name}}}:queue") == 1

    await until(queued, "the other process waits under the learned limit")
    await one.finished(done("task-0"))
    slot = await asyncio.wait_for(waiter, 10)
    await two.created(slot, running("task-9"))  # accepted at the limit: raise it a bit
    await refusing  # woken by the slot that came free
    assert float(await raw.get(f"kling:{{{name}}}:limit") or 0) == pytest.approx(3 + 1 / 3)
    assert (one.limit, two.limit) == (3, 3)


async def test_after_a_1303_the_limit_grows_by_one_over_limit_per_create_at_the_limit(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    account = accounts()
    held = []
    for index in range(4):
        held.append(await account.acquire(f"ext-{index}", nobody))
        if index < 3:
            await account.created(held[-1], running(f"task-{index}"))
    await account.refused(held.pop(), retry_after=0.01)
    running_ids = [f"task-{index}" for index in range(3)]
    expected = 3.0
    for index in range(4, 8):  # one finishes, one more is accepted: always at the limit
        await account.finished(done(running_ids.pop(0)))
        running_ids.append(f"task-{index}")
        slot = await account.acquire(f"ext-{index}", nobody)
        await account.created(slot, running(f"task-{index}"))
        expected += 1 / expected
        limit = float(await raw.get(f"kling:{{{name}}}:limit") or 0)
        assert limit == pytest.approx(expected)
    assert account.limit == 4  # 3 + 1/3 + ... passes 4 at the fourth create


async def test_a_refused_create_wakes_when_a_slot_frees_though_nobody_is_queued(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    one, two = accounts(max_running=2), accounts(max_running=2)
    slot = await one.acquire("ext-a", nobody)
    await one.created(slot, running("task-a"))
    refused = await two.acquire("ext-b", nobody)
    # 1303 with a Retry-After of 600 s: only the news of a freed slot ends the wait soon.
    refusing = asyncio.ensure_future(two.refused(refused, retry_after=600))

    async def given_back() -> bool:
        return await raw.hlen(f"kling:{{{name}}}:leases") == 1

    await until(given_back, "the refused slot given back")
    assert await raw.zcard(f"kling:{{{name}}}:queue") == 0
    await one.finished(done("task-a"))
    await asyncio.wait_for(refusing, 10)


async def test_a_dead_holders_slots_come_free_only_once_their_tasks_finish(
    accounts: Callable[..., RedisAccount],
) -> None:
    dead = accounts(max_running=2, lease=0.3)
    for index in range(2):
        slot = await dead.acquire(f"dead-{index}", nobody)
        await dead.created(slot, running(f"task-{index}", f"dead-{index}"))
    await dead.aclose()  # stops renewing, like kill -9

    finished: set[str] = set()
    looked_up: list[str] = []

    async def lookup(ext: str) -> Task | None:
        looked_up.append(ext)
        index = ext.split("-")[1]
        return done(f"task-{index}") if ext in finished else running(f"task-{index}", ext)

    alive = accounts(max_running=2, lease=0.3)
    waiter = asyncio.ensure_future(alive.acquire("alive", lookup))

    async def both_checked_twice() -> bool:
        return all(looked_up.count(f"dead-{i}") >= 2 for i in range(2))

    await until(both_checked_twice, "the expired leases were looked up, again and again")
    assert not waiter.done()  # still running: the slots stay taken
    finished.add("dead-1")
    slot = await asyncio.wait_for(waiter, 10)
    assert slot.external_task_id == "alive"


async def test_a_dead_claimers_claim_expires(accounts: Callable[..., RedisAccount]) -> None:
    dead = accounts(lease=0.2)
    assert await dead.claim("job-1") == Claim()
    await dead.aclose()
    alive = accounts(lease=0.2)
    taken_over = await asyncio.wait_for(alive.claim("job-1"), 10)
    # Its holder may have sent the create before it died: the taker looks it up first.
    assert taken_over.task is None
    assert taken_over.maybe_since is not None and taken_over.maybe_since >= 0.6


async def test_four_processes_claiming_one_id_create_one_task(
    accounts: Callable[..., RedisAccount],
) -> None:
    four = [accounts() for _ in range(4)]
    creates = 0

    async def create(account: RedisAccount) -> Task:
        nonlocal creates
        existing = (await account.claim("same-id")).task
        if existing is not None:
            return existing
        creates += 1
        await asyncio.sleep(0.05)
        task = running("the-task", "same-id")
        await account.settle("same-id", task)
        return task

    tasks = await asyncio.gather(*(create(account) for account in four))
    assert creates == 1
    assert {task.task_id for task in tasks} == {"the-task"}
    assert {task.external_task_id for task in tasks} == {"same-id"}


async def test_a_failed_create_lets_the_next_claimer_create(
    accounts: Callable[..., RedisAccount],
) -> None:
    one, two = accounts(), accounts()
    assert await one.claim("retry-me") == Claim()
    second = asyncio.ensure_future(two.claim("retry-me"))
    await asyncio.sleep(0.05)
    assert not second.done()
    await one.settle("retry-me", None)
    assert await asyncio.wait_for(second, 10) == Claim()  # now the second's to create


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_redis_down_raises_a_connection_error_naming_redis_not_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _closed_port()
    account = RedisAccount(f"redis://:s3cret-pw@127.0.0.1:{port}/0", name="down")
    try:
        calls: list[Awaitable[object]] = [
            account.acquire("ext", nobody),
            account.claim("ext"),
            account.settle("ext", None),
        ]
        for call in calls:
            with pytest.raises(APIConnectionError) as caught:
                await call
            assert f"Redis at 127.0.0.1:{port}" in str(caught.value)
            assert "s3cret-pw" not in str(caught.value)
            assert "s3cret-pw" not in repr(account)
        # A finished task's slot is given back best effort: raising would make the task
        # look failed, and a job queue would create it again. Its lease runs out instead.
        await account.finished(done("task"))
        await account.aclose()  # waits for the give-back, which failed
        assert f"Redis at 127.0.0.1:{port}" in caplog.text
        assert "s3cret-pw" not in caplog.text
    finally:
        await account.aclose()


async def test_a_cancelled_waiter_leaves_nothing_held_or_queued(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    one, two = accounts(max_running=1), accounts(max_running=1)
    slot = await one.acquire("holder", nobody)
    waiter = asyncio.ensure_future(two.acquire("waiter", nobody))

    async def queued() -> bool:
        return await raw.zcard(f"kling:{{{name}}}:queue") == 1

    await until(queued, "the waiter queued")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await one.release(slot)
    await two.aclose()  # waits for the give-back it started
    assert await raw.hlen(f"kling:{{{name}}}:leases") == 0
    assert await raw.zcard(f"kling:{{{name}}}:queue") == 0


async def test_cancelling_during_the_take_gives_the_slot_back(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    account = accounts(max_running=1)
    for _ in range(20):
        attempt = asyncio.ensure_future(account.acquire("racer", nobody))
        await asyncio.sleep(0)
        attempt.cancel()
        try:
            slot = await attempt
        except asyncio.CancelledError:
            pass
        else:
            await account.release(slot)
    await account.aclose()
    assert await raw.hlen(f"kling:{{{name}}}:leases") == 0


async def test_release_completes_even_when_the_caller_is_cancelled(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis, name: str
) -> None:
    account = accounts(max_running=1)
    slot = await account.acquire("ext", nobody)
    releasing = asyncio.ensure_future(account.release(slot))
    await asyncio.sleep(0)
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing
    await account.aclose()
    assert await raw.hlen(f"kling:{{{name}}}:leases") == 0


async def test_slots_are_put_back_after_redis_loses_its_data(
    redis_server: RedisServer, redis_url: str, name: str
) -> None:
    account = RedisAccount(redis_url, name=name, max_running=2, lease=0.3)
    try:
        for index in range(2):
            slot = await account.acquire(f"ext-{index}", nobody)
            await account.created(slot, running(f"task-{index}"))
        redis_server.restart()
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def restored() -> bool:
                return await raw.hlen(f"kling:{{{name}}}:leases") == 2

            await until(restored, "the holder put its leases back")
            await account.finished(done("task-0"))  # given back in the background

            async def given_back() -> bool:
                return await raw.hlen(f"kling:{{{name}}}:leases") == 1

            await until(given_back, "the finished task's slot given back")
        finally:
            await raw.aclose()
    finally:
        await account.aclose()


async def test_a_client_passed_in_is_not_closed(redis_url: str, name: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    account = RedisAccount(client, name=name, max_running=1)
    slot = await account.acquire("ext", nobody)
    await account.release(slot)
    await account.aclose()
    assert await client.ping()
    await client.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_running": 0}, "max_running"),
        ({"max_running": True}, "max_running"),
        ({"lease": 0}, "lease"),
        ({"lease": float("nan")}, "lease"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments_are_configuration_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisAccount("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]


def test_a_bad_url_is_a_configuration_error_without_the_url() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RedisAccount("http://user:s3cret@example.invalid/")
    assert "s3cret" not in str(caught.value)


# -- the logical clock, the quarantine, the stored limit, round trips -----------------------


async def test_a_new_name_on_a_redis_up_for_longer_than_a_lease_takes_a_slot_at_once(
    redis_url: str,
) -> None:
    # No epoch on a Redis that has been up for a lease: nobody renewed anything under
    # this name for that long (holders renew every third of a lease), so no live holder
    # can have slots to put back: no quarantine. (A restart is another test.)
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def up_for_a_lease() -> bool:
        return int((await raw.info("server"))["uptime_in_seconds"]) >= 1

    await until(up_for_a_lease, "Redis up for longer than the lease")
    account = RedisAccount(redis_url, name=name, max_running=1, lease=0.6)
    try:
        slot = await asyncio.wait_for(account.acquire("first", nobody), 10)
        assert slot.external_task_id == "first"
        assert await raw.zcard(f"kling:{{{name}}}:queue") == 0  # it never had to queue
        assert await account.claim("first-claim") == Claim()  # nothing known against it
    finally:
        await account.aclose()
        await raw.aclose()


async def test_after_redis_lost_its_data_nothing_is_handed_out_before_holders_put_theirs_back(
    redis_server: RedisServer, redis_url: str, name: str
) -> None:
    # Redis tells its uptime in whole seconds: with a lease of 2 s, the first call after
    # the restart is known to be within a lease of it if it comes in the first second
    # or the next (a busy machine has that long to make it).
    holder = RedisAccount(redis_url, name=name, max_running=2, lease=2.0)
    other = RedisAccount(redis_url, name=name, max_running=2, lease=2.0)
    try:
        for index in range(2):
            slot = await holder.acquire(f"held-{index}", nobody)
            await holder.created(slot, running(f"task-{index}", f"held-{index}"))
        assert await holder.claim("claimed") == Claim()
        redis_server.restart()
        # Arrives first on the empty Redis: it must wait, not take a slot the holder has.
        waiting = asyncio.ensure_future(other.acquire("newcomer", nobody))
        claiming = asyncio.ensure_future(other.claim("claimed"))
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def put_back() -> bool:
                leases = await raw.hlen(f"kling:{{{name}}}:leases")
                return leases == 2 and await raw.hexists(f"kling:{{{name}}}:claims", "claimed")

            await until(put_back, "the holder put its slots and claim back")
            await asyncio.sleep(2.5)  # more than a lease: the quarantine is over
            assert not waiting.done()  # the account is full
            assert not claiming.done()  # the holder's claim stands
            await holder.finished(done("task-0", "held-0"))
            slot = await asyncio.wait_for(waiting, 10)
            assert slot.external_task_id == "newcomer"
            await holder.settle("claimed", running("task-c", "claimed"))
            claim = await asyncio.wait_for(claiming, 10)
            assert claim.task is not None and claim.task.task_id == "task-c"
        finally:
            await raw.aclose()
    finally:
        await holder.aclose()
        await other.aclose()


async def test_leases_and_claims_outlive_a_pause_longer_than_themselves(
    own_redis_server: RedisServer,
) -> None:
    url = own_redis_server.url
    name = f"pause-{uuid.uuid4().hex[:8]}"
    seed(url, name)
    looked_up: list[str] = []

    async def lookup(ext: str) -> Task | None:
        looked_up.append(ext)
        return None  # "absent": a look-up would free the slot

    holder = RedisAccount(url, name=name, max_running=1, lease=0.6)
    other = RedisAccount(url, name=name, max_running=1, lease=0.6)
    try:
        slot = await holder.acquire("creating", lookup)  # its create is under way
        assert await holder.claim("job") == Claim()
        waiting = asyncio.ensure_future(other.acquire("waiter", lookup))
        claiming = asyncio.ensure_future(other.claim("job"))
        await asyncio.sleep(0.3)
        raw = aioredis.Redis.from_url(url, decode_responses=True)
        clock = f"kling:{{{name}}}:clock"
        try:
            before = float(await raw.hget(clock, "c") or 0)
            own_redis_server.pause()
            await asyncio.sleep(2.0)  # longer than the lease and than the claim (3 leases)
            own_redis_server.resume()
            # The first scripts after the pause move the account's clock by a third of a
            # lease at most: the pause itself does not count.
            after = float(await raw.hget(clock, "c") or 0)
            assert after - before < 2000 / 2
        finally:
            await raw.aclose()
        await asyncio.sleep(1.5)  # Redis answers again for more than a lease
        assert not waiting.done() and not claiming.done()
        assert looked_up == []  # a live holder's slot is never looked up
        await holder.release(slot)
        await holder.settle("job", None)
        assert (await asyncio.wait_for(waiting, 10)).external_task_id == "waiter"
        assert await asyncio.wait_for(claiming, 10) == Claim()  # nothing against it
    finally:
        await holder.aclose()
        await other.aclose()


async def test_an_ambiguous_create_leaves_a_maybe_record_for_the_next_claim(
    accounts: Callable[..., RedisAccount],
) -> None:
    one, two = accounts(), accounts()
    assert await one.claim("ambiguous") == Claim()
    await one.settle("ambiguous", None, maybe_created=True)
    claim = await two.claim("ambiguous")
    assert claim.task is None
    assert claim.maybe_since is not None and 0 <= claim.maybe_since < 60
    await two.settle("ambiguous", None)  # a definite failure keeps the record
    again = await one.claim("ambiguous")
    assert again.maybe_since is not None


async def test_a_creating_slot_is_never_looked_up_by_its_own_check(
    accounts: Callable[..., RedisAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kling_async.redis as module

    monkeypatch.setattr(module, "CHECK_AFTER", 0.0)
    looked_up: list[str] = []

    async def lookup(ext: str) -> Task | None:
        looked_up.append(ext)
        return None

    account = accounts(max_running=1, lease=0.3)
    slot = await account.acquire("slow-create", lookup)  # a 1302 with Retry-After: 25 ...
    await asyncio.sleep(1.0)  # many renewals and checks
    assert looked_up == []
    assert slot.creating
    await account.created(slot, running("task", "slow-create"))
    await until(lambda: _true(bool(looked_up)), "checked once created")


async def _true(value: bool) -> bool:
    return value


async def test_finished_does_not_wait_for_redis(own_redis_server: RedisServer) -> None:
    url = own_redis_server.url
    name = f"finish-{uuid.uuid4().hex[:8]}"
    seed(url, name)
    account = RedisAccount(url, name=name, max_running=1, lease=1.0)
    try:
        slot = await account.acquire("ext", nobody)
        await account.created(slot, running("task", "ext"))
        own_redis_server.pause()
        try:
            await asyncio.wait_for(account.finished(done("task", "ext")), 0.5)
        finally:
            own_redis_server.resume()
    finally:
        await account.aclose()


async def test_a_create_with_a_given_limit_costs_two_round_trips(
    accounts: Callable[..., RedisAccount], raw: aioredis.Redis
) -> None:
    account = accounts(max_running=4)
    await account.release(await account.acquire("warm-up", nobody))

    async def script_calls() -> int:
        stats = await raw.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))

    before = await script_calls()
    for index in range(10):
        slot = await account.acquire(f"ext-{index}", nobody)
        await account.created(slot, running(f"task-{index}", f"ext-{index}"))
        await account.finished(done(f"task-{index}", f"ext-{index}"))
    await until(lambda: _true(not account._background), "the give-backs done")
    assert await script_calls() - before == 20  # take, give back: no "created" write


async def test_processes_given_different_limits_use_the_smallest_and_warn(
    accounts: Callable[..., RedisAccount], caplog: pytest.LogCaptureFixture
) -> None:
    small, large = accounts(max_running=2), accounts(max_running=5)
    first = await small.acquire("small-0", nobody)
    held = [await large.acquire("large-0", nobody)]
    waiting = asyncio.ensure_future(large.acquire("large-1", nobody))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # 2 held: the smallest live limit
    assert (small.limit, large.limit) == (2, 2)
    assert "given max_running=5, another process on it was given max_running=2" in caplog.text
    await small.release(first)
    held.append(await asyncio.wait_for(waiting, 10))
    for slot in held:
        await large.release(slot)


async def redis_uptime(redis_url: str) -> int:
    """Redis's ``uptime_in_seconds`` (whole seconds)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int((await client.info("server"))["uptime_in_seconds"])
    finally:
        await client.aclose()


async def test_a_claim_soon_after_redis_lost_its_data_may_have_been_sent(
    redis_server: RedisServer, redis_url: str, name: str
) -> None:
    # A holder that died just before the restart lost its claim with the data: a claim
    # granted within a lease of the loss says so (the create looks the id up first).
    # Redis tells its uptime in whole seconds, so with a 0.3 s lease "within a lease" is
    # "in Redis's first second". A busy machine may claim later than that, and then the
    # claim is rightly not held back (holders had more than a lease to put theirs back):
    # such a try says nothing, and is made again after a new restart.
    for _ in range(20):
        redis_server.restart()
        account = RedisAccount(redis_url, name=name, lease=0.3)
        try:
            claim = await asyncio.wait_for(account.claim("after-restart"), 10)
            if await redis_uptime(redis_url) > 0:
                continue  # every call of the account may have come after the first second
            assert claim.task is None
            assert claim.maybe_since is not None and claim.maybe_since >= 0.3  # quarantine
            await account.settle("after-restart", None)
            for attempt in range(200):  # until CLAIM_LEASES + 1 leases of answering time
                later = await account.claim(f"later-{attempt}")
                await account.settle(f"later-{attempt}", None)
                if later == Claim():
                    return
                await asyncio.sleep(0.05)
            pytest.fail("claims soon after the loss never stopped saying so")
        finally:
            await account.aclose()
    pytest.fail("in 20 restarts, no claim reached Redis within its first second")
