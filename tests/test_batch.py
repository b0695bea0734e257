"""extend_many and extend_chain against the simulator: limits, faults, journal, cancel."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kling_async import (
    BatchResult,
    ExtendRequest,
    InsufficientBalanceError,
    KlingClient,
    TaskFailedError,
    ValidationError,
    Video,
)
from kling_async._batch import BatchProgress
from kling_async.testing import ALL_FAULT_KINDS, Simulator
from tests.conftest import FAST_POLL


def requests(n: int, prefix: str = "video") -> list[ExtendRequest]:
    return [ExtendRequest(video_id=f"{prefix}-{i}", prompt=f"extend {i}") for i in range(n)]


async def collect(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [result async for result in results]


def assert_one_task_per_input(sim: Simulator, n: int) -> None:
    assert sim.counters.tasks_created == n
    assert not sim.counters.duplicate_external_ids


async def test_wait_true_yields_one_result_per_input(client: KlingClient, sim: Simulator) -> None:
    snapshots: list[BatchProgress] = []
    results = await collect(
        client.extend_many(requests(20), concurrency=5, on_progress=snapshots.append)
    )
    assert sorted(r.index for r in results) == list(range(20))
    assert all(r.ok and r.task is not None and r.task.succeeded for r in results)
    assert all(r.request.video_id == f"video-{r.index}" for r in results)
    assert_one_task_per_input(sim, 20)
    last = snapshots[-1]
    assert (last.succeeded, last.failed, last.pending, last.running, last.total) == (
        20,
        0,
        0,
        0,
        20,
    )
    assert last.submitted == 20
    assert max(s.running for s in snapshots) <= 5


async def test_wait_false_is_done_when_created(client: KlingClient, sim: Simulator) -> None:
    results = await collect(client.extend_many(iter(requests(10)), wait=False))
    assert all(r.ok and r.task is not None and not r.task.is_terminal for r in results)
    assert_one_task_per_input(sim, 10)


async def test_failed_items_are_results_not_exceptions() -> None:
    async with (
        Simulator(failure_rate=1.0, submit_time=0, processing_time=0.01) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        items: list[object] = [*requests(3), "not a request"]
        results = await collect(kling.extend_many(items))  # type: ignore[arg-type]
    failures = [r for r in results if isinstance(r.error, TaskFailedError)]
    assert len(failures) == 3 and all(r.task is not None and r.task.failed for r in failures)
    odd = next(r for r in results if isinstance(r.error, ValidationError))
    assert odd.index == 3 and "requests[3]" in str(odd.error)


async def test_async_iterable_input_and_async_progress(client: KlingClient) -> None:
    async def source() -> AsyncIterator[ExtendRequest]:
        for request in requests(6):
            await asyncio.sleep(0)
            yield request

    calls: list[int] = []

    async def progress(snapshot: BatchProgress) -> None:
        calls.append(snapshot.succeeded)

    results = await collect(client.extend_many(source(), concurrency=2, on_progress=progress))
    assert len(results) == 6 and calls[-1] == 6


async def test_bad_arguments(client: KlingClient) -> None:
    with pytest.raises(ValidationError, match="concurrency"):
        await collect(client.extend_many(requests(1), concurrency=0))
    with pytest.raises(ValidationError, match="requests"):
        await collect(client.extend_many("abc"))  # type: ignore[arg-type]


async def test_input_errors_end_the_batch(client: KlingClient) -> None:
    def broken() -> Iterator[ExtendRequest]:
        yield from requests(2)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await collect(client.extend_many(broken(), concurrency=1))


@pytest.mark.slow
async def test_input_is_read_lazily(sim: Simulator) -> None:
    pulled = 0
    concurrency = 8

    def source() -> Iterator[ExtendRequest]:
        nonlocal pulled
        for i in range(2_000):
            pulled += 1
            yield ExtendRequest(video_id=f"v{i}", prompt="p")

    done = 0
    worst = 0
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, max_in_flight=concurrency
    ) as kling:
        async for _ in kling.extend_many(source(), concurrency=concurrency, wait=False):
            done += 1
            worst = max(worst, pulled - done)
            assert pulled <= done + 2 * concurrency + 1  # in hand + buffered results
    assert done == 2_000
    assert worst <= 2 * concurrency + 1
    assert_one_task_per_input(sim, 2_000)


async def test_account_running_limit_is_respected() -> None:
    async with (
        Simulator(running_limit=3, submit_time=0.02, processing_time=0.05, seed=3) as sim,
        KlingClient(
            api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, max_in_flight=12
        ) as kling,
    ):
        snapshots: list[BatchProgress] = []
        results = await collect(
            kling.extend_many(requests(60), concurrency=12, on_progress=snapshots.append)
        )
    assert len(results) == 60 and all(r.ok for r in results)
    assert_one_task_per_input(sim, 60)
    throttled = snapshots[-1].throttled
    assert throttled == sim.counters.rejected_1303 > 0
    assert min(s.concurrency for s in snapshots) < 12  # it backed off ...
    print(f"1303 answers: {throttled}, creates: {sim.counters.creates}")


@pytest.mark.slow
async def test_faults_on_creates_and_polls_lose_and_duplicate_nothing() -> None:
    async with Simulator(submit_time=0.01, processing_time=0.05, seed=11) as sim:
        kinds = [kind for kind in ALL_FAULT_KINDS if kind != "short_body"]
        sim.set_fault_rate(0.3, on="create", kinds=kinds, retry_after=0.01, delay=0.5)
        sim.set_fault_rate(0.3, on="get", kinds=kinds, retry_after=0.01, delay=0.5)
        async with KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            poll=FAST_POLL,
            max_in_flight=16,
            max_retries=12,
            timeout=0.25,
        ) as kling:
            results = await collect(kling.extend_many(requests(150), concurrency=32))
        assert len(results) == 150
        assert [r.error for r in results if not r.ok] == []
        assert_one_task_per_input(sim, 150)
        assert sim.counters.peak_concurrent_requests <= 16
        assert sim.counters.faults_injected > 30


async def test_no_credit_stops_submissions() -> None:
    async with (
        Simulator(credit=5, submit_time=0, processing_time=0.05) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        results = await collect(kling.extend_many(requests(30), concurrency=4))
        creates_then = sim.counters.creates
    assert len(results) == 30
    ok = [r for r in results if r.ok]
    broke = [r for r in results if isinstance(r.error, InsufficientBalanceError)]
    assert len(ok) == 5 and len(broke) == 25
    assert all(r.error is not None and r.error.code == 1102 for r in broke)  # type: ignore[attr-defined]
    # Only creates already on their way when the first 1102 came back were sent after it.
    assert sim.counters.rejected_1102 <= 4
    assert creates_then <= 5 + 4


async def test_leaving_the_loop_cancels_everything(sim: Simulator) -> None:
    sim.processing_time = 5.0
    before = asyncio.all_tasks()
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling:
        got = 0
        loop = asyncio.get_running_loop()
        async for result in kling.extend_many(
            (ExtendRequest(video_id=f"v{i}", prompt="p") for i in range(100)),
            concurrency=10,
            wait=False,
        ):
            assert result.ok
            got += 1
            if got == 3:
                break
        started = loop.time()
        gc.collect()
        # A generous bound that only a real hang reaches (a busy machine is slow, not stuck).
        while left := [task for task in asyncio.all_tasks() - before if _ours(task)]:
            assert loop.time() - started < 30.0, left
            await asyncio.sleep(0.01)
    assert sim.counters.tasks_created < 100


def _ours(task: asyncio.Task[object]) -> bool:
    # The simulator's per-connection server tasks live while the client's pool keeps an
    # idle connection open (closed with the client); everything else must be gone.
    name = getattr(task.get_coro(), "__qualname__", "")
    return task is not asyncio.current_task() and not name.startswith("RequestHandler.")


async def test_explicit_aclose_cancels_waiting_items(sim: Simulator) -> None:
    sim.processing_time = 5.0
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling:
        results = kling.extend_many(requests(5), concurrency=5)
        waiter = asyncio.ensure_future(results.__anext__())
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await results.aclose()  # type: ignore[attr-defined]
        assert sim.counters.tasks_created == 5


# -- journal -------------------------------------------------------------------------------------


async def test_journal_rerun_yields_finished_items_without_requests(
    client: KlingClient, sim: Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "batch.sqlite"
    first = await collect(client.extend_many(requests(10), journal=journal))
    requests_before = sim.counters.requests
    again = await collect(client.extend_many(requests(10), journal=journal))
    assert sim.counters.requests == requests_before
    assert sorted((r.index, r.task) for r in again) == sorted((r.index, r.task) for r in first)
    external_ids = {r.task.external_task_id for r in first if r.task}
    assert all(e and e.startswith("kling-batch-") for e in external_ids)
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT count(*) FROM items WHERE state='finished'").fetchone()[0] == 10


async def test_journal_with_wait_false_then_wait_true(
    client: KlingClient, sim: Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    created = await collect(client.extend_many(requests(6), journal=journal, wait=False))
    assert all(r.ok for r in created)
    repeat = await collect(client.extend_many(requests(6), journal=journal, wait=False))
    assert sim.counters.creates == 6 and len(repeat) == 6
    finished = await collect(client.extend_many(requests(6), journal=journal))
    assert all(r.ok and r.task is not None and r.task.succeeded for r in finished)
    assert_one_task_per_input(sim, 6)


async def test_journal_refuses_a_different_input(client: KlingClient, tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    await collect(client.extend_many(requests(3), journal=journal, wait=False))
    with pytest.raises(ValidationError, match="item 0 of the input differs"):
        await collect(client.extend_many(requests(3, prefix="other"), journal=journal))


async def test_journal_that_is_not_sqlite(client: KlingClient, tmp_path: Path) -> None:
    journal = tmp_path / "notes.txt"
    journal.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(ValidationError, match="journal"):
        await collect(client.extend_many(requests(1), journal=journal))


async def test_journal_retries_transient_errors_on_rerun(sim: Simulator, tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    sim.inject("503", on="create", times=3)
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, max_retries=0
    ) as kling:
        first = await collect(kling.extend_many(requests(1), journal=journal, concurrency=1))
        assert not first[0].ok
        # 503 may have created the task: the rerun looks it up before it submits again
        sim.clear_faults()
        second = await collect(kling.extend_many(requests(1), journal=journal))
    assert second[0].ok
    assert_one_task_per_input(sim, 1)


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from kling_async import ExtendRequest, KlingClient, PollPolicy

    async def main(base_url, journal):
        poll = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)
        async with KlingClient(api_key="sim-api-key", base_url=base_url, poll=poll) as kling:
            items = (ExtendRequest(video_id=f"video-{i}", prompt=f"extend {i}")
                     for i in range(40))
            async for result in kling.extend_many(items, concurrency=8, journal=journal):
                print(result.index, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_crash_and_resume_with_sigkill(tmp_path: Path) -> None:
    journal = tmp_path / "crash.sqlite"
    script = tmp_path / "run_batch.py"
    script.write_text(CRASH_SCRIPT)
    async with Simulator(submit_time=0.02, processing_time=0.3, seed=5) as sim:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            sim.base_url,
            str(journal),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        assert process.stdout is not None
        printed = []
        while len(printed) < 10:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, (await process.stderr.read()).decode() if process.stderr else ""
            printed.append(int(line))
        process.send_signal(signal.SIGKILL)
        await process.wait()
        assert sim.counters.tasks_created < 40  # killed mid-way
        async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling:
            results = await collect(
                kling.extend_many(
                    (ExtendRequest(video_id=f"video-{i}", prompt=f"extend {i}") for i in range(40)),
                    concurrency=8,
                    journal=journal,
                )
            )
        assert sorted(r.index for r in results) == list(range(40))
        assert all(r.ok for r in results)
        assert_one_task_per_input(sim, 40)
        assert set(sim.counters.creates_by_external_id) == {
            r.task.external_task_id for r in results if r.task
        }


# -- extend_chain ----------------------------------------------------------------------------------


async def test_chain_grows_the_video(client: KlingClient, sim: Simulator) -> None:
    steps = await client.extend_chain("start-video", ["one", "two", "three"], cfg_scale=0.4)
    assert len(steps) == 3
    durations = [step.videos[0].duration for step in steps]
    assert durations == sorted(durations) and durations[0] > 5.1
    assert all(
        4.0 <= b - a <= 5.0 + 1e-9 for a, b in zip([5.1, *durations], durations, strict=False)
    )
    posts = [r for r in sim.recent_requests if r.method == "POST"]
    assert b'"video_id":"start-video"' in posts[0].body
    assert f'"video_id":"{steps[0].videos[0].id}"'.encode() in posts[1].body
    assert f'"task_id":"{steps[0].task_id}"'.encode() in posts[1].body


async def test_chain_that_would_pass_three_minutes_is_refused_up_front(
    client: KlingClient, sim: Simulator
) -> None:
    long_video = Video(id="long", url="https://cdn.example.com/long.mp4", duration=172.0)
    with pytest.raises(ValidationError, match="180"):
        await client.extend_chain(long_video, ["a", "b"])
    with pytest.raises(ValidationError, match="180"):
        await client.extend_chain("any", ["p"] * 46)
    assert sim.counters.requests == 0
    steps = await client.extend_chain(long_video, ["a"])
    assert len(steps) == 1


async def test_chain_refuses_when_a_later_step_could_pass_the_limit(
    client: KlingClient, sim: Simulator
) -> None:
    video = Video(id="v", url="https://cdn.example.com/v.mp4", duration=165.0)
    with pytest.raises(ValidationError, match="step"):
        await client.extend_chain(video, ["a", "b", "c", "d"])
    assert sim.counters.requests == 0


async def test_chain_bad_options(client: KlingClient) -> None:
    with pytest.raises(ValidationError, match="external_task_id"):
        await client.extend_chain("v", ["a"], external_task_id="x")
    with pytest.raises(ValidationError, match="prompts"):
        await client.extend_chain("v", [])
    with pytest.raises(ValidationError, match="cfg_scale"):
        await client.extend_chain("v", ["a"], cfg_scale=2)


async def test_chain_failure_carries_the_steps_done() -> None:
    async with (
        Simulator(submit_time=0, processing_time=0.02) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        first = await kling.extend_chain("v", ["a"])
        sim.failure_rate = 1.0
        with pytest.raises(TaskFailedError) as caught:
            await kling.extend_chain(first[0].videos[0], ["b"])
        assert caught.value.steps == ()
        sim.failure_rate = 0.0


async def test_batch_finishes_on_callbacks_without_polling() -> None:
    from kling_async import PollPolicy
    from kling_async.callbacks import CallbackReceiver

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    receiver = CallbackReceiver(secret)
    async with (
        Simulator(submit_time=0.02, processing_time=0.05, webhook_secret=secret) as sim,
        receiver.serve() as url,
        KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            poll=PollPolicy(initial=30.0, max_interval=60.0),
        ) as kling,
    ):
        results = await collect(kling.extend_many(requests(12), concurrency=6, callbacks=receiver))
        assert all(r.ok and r.task is not None and r.task.succeeded for r in results)
        assert_one_task_per_input(sim, 12)
        assert sim.counters.gets == 0  # every wait ended on its callback
        assert sim.counters.callbacks_sent >= 12
        posts = [r for r in sim.recent_requests if r.method == "POST"]
        assert all(f'"callback_url":"{url}"'.encode() in r.body for r in posts)
