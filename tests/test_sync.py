"""`SyncKlingClient`: the async client without ``await``, over real sockets.

From a plain thread, from 16 threads at once, from inside a running loop (as a notebook
cell), as plain iterators that cancel what is left when left early, and interrupted by
a real SIGINT in a real process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kling_async import (
    ConfigurationError,
    ExtendRequest,
    PollPolicy,
    SyncKlingClient,
    Task,
    TaskStatus,
)
from kling_async.testing import Simulator

ROOT = Path(__file__).resolve().parent.parent
VIDEO = "828006748715380777"
POLL = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(submit_time=0.02, processing_time=0.05, seed=3).run_in_thread() as simulator:
        yield simulator


@pytest.fixture
def kling(sim: Simulator) -> Iterator[SyncKlingClient]:
    with SyncKlingClient(
        api_key=sim.api_key, base_url=sim.base_url, poll=POLL, timeout=5.0
    ) as client:
        yield client


def test_a_script_extends_waits_lists_and_downloads(
    kling: SyncKlingClient, sim: Simulator, tmp_path: Path
) -> None:
    updates: list[tuple[TaskStatus, str]] = []
    done = kling.extend_and_wait(
        ExtendRequest(VIDEO, "the tide rises"),
        on_update=lambda task: updates.append((task.status, threading.current_thread().name)),
    )
    assert done.succeeded and updates[-1][0] is TaskStatus.SUCCEED
    # Hooks run in the client's own thread.
    assert {name for _, name in updates} == {"kling-async-sync"}
    assert kling.get_task(done.task_id).status is TaskStatus.SUCCEED
    assert kling.get_task(external_task_id=done.external_task_id).task_id == done.task_id
    assert [t.task_id for t in kling.list_tasks()] == [done.task_id]
    assert [t.task_id for t in kling.iter_tasks(page_size=1)] == [done.task_id]
    path = kling.download(done, tmp_path)
    assert path.read_bytes()[4:8] == b"ftyp"  # the MP4 the simulator served
    assert kling.resource_packs() == []
    assert sim.counters.tasks_created == 1


def test_sixteen_threads_share_one_client(kling: SyncKlingClient, sim: Simulator) -> None:
    def one(n: int) -> Task:
        return kling.extend_and_wait(ExtendRequest(VIDEO, f"thread {n}"))

    with ThreadPoolExecutor(16) as pool:
        tasks = list(pool.map(one, range(16)))
    assert all(task.succeeded for task in tasks)
    assert len({task.task_id for task in tasks}) == 16
    assert sim.counters.tasks_created == 16
    assert not sim.counters.duplicate_external_ids
    assert sim.counters.peak_concurrent_requests <= kling.max_in_flight


def test_works_where_the_calling_thread_runs_a_loop(kling: SyncKlingClient) -> None:
    # A notebook cell: a loop runs in this thread, and plain code inside it calls us.
    def cell() -> Task:
        return kling.extend_and_wait(ExtendRequest(VIDEO, "from a notebook"))

    async def notebook() -> Task:
        return cell()

    assert asyncio.run(notebook()).succeeded


def test_extend_many_is_lazy_and_leaving_early_cancels_the_rest(sim: Simulator) -> None:
    sim.processing_time = 30.0  # most items stay running: leaving must cancel them
    read = itertools.count()

    def requests() -> Iterator[ExtendRequest]:
        for n in range(100_000):
            next(read)
            yield ExtendRequest(VIDEO, f"item {n}")

    with SyncKlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=POLL) as kling:
        results = kling.extend_many(requests(), concurrency=4, wait=False)
        first = [next(results) for _ in range(3)]
        results.close()
        assert all(result.ok for result in first)
        consumed = next(read)
        assert consumed < 50  # read lazily: far from the 100 000 items
        # Nothing of the batch is left running on the client's loop.
        assert kling._run(_other_tasks()) == 0
        assert kling.get_task(first[0].task.task_id if first[0].task else "").task_id
    # Creates already on the wire when the iteration was left may still land (a request
    # sent cannot be unsent), but every task is one of the few items read.
    assert sim.counters.tasks_created <= consumed


async def _other_tasks() -> int:
    return len(asyncio.all_tasks()) - 1


def test_extend_many_waits_and_reports_every_item(kling: SyncKlingClient) -> None:
    requests = [ExtendRequest(VIDEO, f"item {n}") for n in range(5)]
    seen: list[int] = []
    results = list(kling.extend_many(requests, on_update=lambda index, _: seen.append(index)))
    assert sorted(r.index for r in results) == list(range(5))
    assert all(r.ok and r.task is not None and r.task.succeeded for r in results)
    assert set(seen) == set(range(5))


def test_closed_facade_raises_clearly(sim: Simulator) -> None:
    kling = SyncKlingClient(api_key=sim.api_key, base_url=sim.base_url)
    thread = kling._thread
    kling.close()
    kling.close()  # twice is fine
    assert not thread.is_alive()  # closing joins the thread
    assert "closed" in repr(kling)
    with pytest.raises(RuntimeError, match="closed"):
        kling.get_task("1")
    with pytest.raises(RuntimeError, match="closed"):
        kling.extend_many([ExtendRequest(VIDEO, "late")])


def test_session_is_refused_and_credentials_stay_out_of_repr(sim: Simulator) -> None:
    with pytest.raises(ConfigurationError, match="session"):
        SyncKlingClient(api_key="k", base_url=sim.base_url, session=object())
    secret = "sk-sync-very-secret"
    with SyncKlingClient(api_key=secret, base_url=sim.base_url) as kling:
        assert secret not in repr(kling)


def test_a_hook_calling_the_facade_is_refused(kling: SyncKlingClient) -> None:
    problems: list[str] = []

    def hook(task: Task) -> None:
        try:
            kling.get_task(task.task_id)
        except RuntimeError as error:
            problems.append(str(error))

    kling.extend_and_wait(ExtendRequest(VIDEO, "hooked"), on_update=hook)
    assert problems and "its own hooks" in problems[0]


def test_an_unclosed_facade_does_not_keep_the_interpreter_alive(sim: Simulator) -> None:
    code = (
        "from kling_async import SyncKlingClient\n"
        f"kling = SyncKlingClient(api_key={sim.api_key!r}, base_url={sim.base_url!r})\n"
        "print(len(kling.list_tasks()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "0"
    assert "Unclosed" not in out.stderr


@pytest.mark.parametrize("mode", ["wait", "batch"])
def test_ctrl_c_cancels_the_call_and_says_which_tasks_go_on(sim: Simulator, mode: str) -> None:
    sim.processing_time = 60.0  # still running when the Ctrl-C comes
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "sync_worker.py"),
            mode,
            sim.base_url,
            str(sim.api_key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"the script ended early: {process.communicate(timeout=60)}"
        waiting = json.loads(line)["waiting"]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    told = f"exit {process.returncode}\nstdout: {out}\nstderr: {err}"
    assert process.returncode == -signal.SIGINT, told  # ended by the interrupt, as a script is
    assert "not interrupted" not in out, told
    assert "KeyboardInterrupt" in err, told
    assert "go on at Kling" in err, told
    for task_id in waiting:
        assert task_id in err, told
    # The interrupted call sent nothing more: every task is one the script had created.
    assert sim.counters.tasks_created == len(sim.tasks)
    # The process is gone; a request of its that the simulator was still answering ends
    # (a generous bound that only a hang reaches: a busy machine is slow, not stuck).
    deadline = time.monotonic() + 30
    while sim.counters.concurrent_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.counters.concurrent_requests == 0
