"""A journal has one owner: a second run on a journal in use is refused before any request,
a killed run's lock dies with it, a `pending` row is durable before its POST, and a resume
looks every unfinished item up, even one whose row was lost with the `-wal` file.

Everything runs over real sockets against the simulator and is judged by its counters;
the other runs are real processes (`tests/journal_worker.py`) where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kling_async import BatchResult, ExtendRequest, KlingClient, ValidationError
from kling_async._journal import FINISHED, PENDING, Journal
from kling_async.testing import Simulator
from tests.conftest import FAST_POLL
from tests.journal_worker import RAISED, batch_requests

WORKER = str(Path(__file__).with_name("journal_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)
#: The longest any single wait in these tests may take (they take well under a second).
BOUND = 60.0
#: Long enough that a task never finishes during a test unless told to.
FOREVER = 3600.0


# -- helpers -------------------------------------------------------------------------------


async def collect(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [result async for result in results]


async def wait_until(
    condition: Callable[[], bool], process: asyncio.subprocess.Process | None = None
) -> None:
    async def poll() -> None:
        while not condition():
            if process is not None and process.returncode is not None:
                output = await process.stdout.read() if process.stdout else b""
                pytest.fail(f"the worker ended early ({process.returncode}): {output!r}")
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), BOUND)


async def start_worker(
    sim: Simulator, journal: Path, *, items: int, concurrency: int, wait: bool = True
) -> asyncio.subprocess.Process:
    config = {
        "base_url": sim.base_url,
        "api_key": sim.api_key,
        "journal": str(journal),
        "items": items,
        "concurrency": concurrency,
        "wait": wait,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        WORKER,
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": ROOT},  # this checkout's kling_async
    )


async def kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()  # SIGKILL: no cleanup of any kind
    await asyncio.wait_for(process.wait(), BOUND)


def client(sim: Simulator) -> KlingClient:
    return KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, timeout=10.0)


async def held_input(
    requests: list[ExtendRequest], first: int, release: asyncio.Event
) -> AsyncIterator[ExtendRequest]:
    """`first` requests, then nothing until `release`: the run holds its journal, idle."""
    for request in requests[:first]:
        yield request
    await release.wait()


def lookups(sim: Simulator) -> list[str]:
    """The external ids looked up (GET by external id), oldest first."""
    return [
        r.path.rsplit("/", 1)[-1]
        for r in sim.recent_requests
        if r.method == "GET" and r.server == "api" and "/kling-batch-" in r.path
    ]


def posted(sim: Simulator) -> list[str]:
    """The external ids of the creates the simulator received, oldest first."""
    return [
        json.loads(r.body)["external_task_id"]
        for r in sim.recent_requests
        if r.method == "POST" and r.server == "api"
    ]


def read_rows(path: Path) -> dict[int, str]:
    """The journal's item states, read by a connection of its own (closed after)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT idx, state FROM items").fetchall())


def read_batch_id(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return str(db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()[0])


def has_shm(path: Path) -> bool:
    return path.with_name(f"{path.name}-shm").exists()


def in_use(path: Path) -> str:
    return f"journal: {path} is in use by another run"


# -- one owner -----------------------------------------------------------------------------


async def test_a_second_process_is_refused_while_a_run_holds_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "held.journal"
    release = asyncio.Event()
    async with (
        Simulator(submit_time=0, processing_time=0.01, seed=1) as sim,
        client(sim) as kling,
    ):
        run = kling.extend_many(held_input(batch_requests(4), 2, release), journal=path)
        first = [await asyncio.wait_for(anext(run), BOUND) for _ in range(2)]
        assert all(r.ok for r in first)
        await wait_until(lambda: sim.counters.tasks_created == 2)
        # The run now holds the journal and sends nothing: whatever arrives is the worker's.
        seen = sim.counters.requests
        assert not has_shm(path)  # exclusive WAL mode: no shared-memory file

        worker = await start_worker(sim, path, items=4, concurrency=2)
        output, _ = await asyncio.wait_for(worker.communicate(), BOUND)
        assert worker.returncode == RAISED, output
        said = json.loads(output.decode().splitlines()[-1])
        assert said["raised"] == "ValidationError"
        assert said["message"].startswith(in_use(path))
        assert sim.counters.requests == seen and sim.counters.creates == 2

        release.set()
        assert await asyncio.wait_for(collect(run), BOUND) == []
    # Closed: the journal is anyone's again, and reads as an ordinary SQLite file.
    assert read_rows(path) == {0: FINISHED, 1: FINISHED}
    assert sim.counters.tasks_created == 2 and sim.counters.duplicate_external_ids == {}


async def test_a_second_run_in_the_same_process_is_refused_before_any_request(
    tmp_path: Path,
) -> None:
    path = tmp_path / "twice.journal"
    release = asyncio.Event()
    async with (
        Simulator(submit_time=0, processing_time=0.01, seed=2) as sim,
        client(sim) as kling,
    ):
        run = kling.extend_many(held_input(batch_requests(3), 1, release), journal=path)
        assert (await asyncio.wait_for(anext(run), BOUND)).ok
        seen = sim.counters.requests
        with pytest.raises(ValidationError) as caught:
            await asyncio.wait_for(
                collect(kling.extend_many(batch_requests(3), journal=path)), BOUND
            )
        assert str(caught.value).startswith(in_use(path))
        assert caught.value.field == "journal"
        assert sim.counters.requests == seen
        # The refusal left the holder's lock alone: another process is refused too.
        worker = await start_worker(sim, path, items=3, concurrency=1)
        output, _ = await asyncio.wait_for(worker.communicate(), BOUND)
        assert worker.returncode == RAISED, output
        assert sim.counters.requests == seen
        release.set()
        assert await asyncio.wait_for(collect(run), BOUND) == []
        # Once the first run is over, the same journal runs again (and finishes the rest).
        again = await asyncio.wait_for(
            collect(kling.extend_many(batch_requests(3), journal=path)), BOUND
        )
    assert sorted(r.index for r in again) == [0, 1, 2] and all(r.ok for r in again)
    assert sim.counters.tasks_created == 3 and sim.counters.duplicate_external_ids == {}


async def test_a_killed_runs_journal_is_taken_by_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "killed.journal"
    async with (
        Simulator(submit_time=0, processing_time=FOREVER, seed=3) as sim,
        client(sim) as kling,
    ):
        worker = await start_worker(sim, path, items=6, concurrency=3)
        try:
            await wait_until(lambda: sim.counters.tasks_created == 3, worker)
        finally:
            await kill(worker)
        assert worker.returncode == -9
        # What the killed run created finishes; the rest is quick.
        for external_id in posted(sim):
            sim.finish_task(external_id)
        sim.processing_time = 0.02
        results = await asyncio.wait_for(
            collect(kling.extend_many(batch_requests(6), journal=path, concurrency=3)), BOUND
        )
    assert sorted(r.index for r in results) == list(range(6))
    assert all(r.ok and r.task is not None and r.task.succeeded for r in results)
    assert sim.counters.tasks_created == 6
    assert sim.counters.duplicate_external_ids == {}
    assert read_rows(path) == dict.fromkeys(range(6), FINISHED)


# -- a resume looks up before it submits -------------------------------------------------------


async def test_a_journal_copied_without_its_wal_resumes_by_looking_items_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "live.journal"
    copy = tmp_path / "copied.journal"
    async with (
        Simulator(submit_time=0, processing_time=FOREVER, seed=4) as sim,
        client(sim) as kling,
    ):
        worker = await start_worker(sim, path, items=6, concurrency=3)
        try:
            await wait_until(lambda: sim.counters.tasks_created == 3, worker)
            # What an OS crash can leave: the main file, without the -wal it was writing.
            shutil.copyfile(path, copy)
        finally:
            await kill(worker)
        sent = posted(sim)
        first_tasks = {e: sim.task_by_external_id(e) for e in sent}
        assert len(sent) == 3 and all(first_tasks.values())
        # The copy lost every item row, but kept the batch id (written before WAL mode).
        assert read_rows(copy) == {}
        batch_id = read_batch_id(copy)
        assert all(e.startswith(f"kling-batch-{batch_id}-") for e in sent)

        looked_before = len(lookups(sim))
        results = await asyncio.wait_for(
            collect(kling.extend_many(batch_requests(6), journal=copy, concurrency=3, wait=False)),
            BOUND,
        )
        looked = lookups(sim)[looked_before:]
    assert sorted(r.index for r in results) == list(range(6)) and all(r.ok for r in results)
    # Every item was looked up, the lost ones were found, and only the rest was created.
    assert sorted(looked) == sorted(f"kling-batch-{batch_id}-{i}" for i in range(6))
    assert sim.counters.tasks_created == 6
    assert sim.counters.duplicate_external_ids == {}
    by_external = {r.task.external_task_id: r.task for r in results if r.task is not None}
    for external_id, task in first_tasks.items():
        assert task is not None and by_external[external_id].task_id == task.task_id


async def test_a_fresh_journal_looks_nothing_up(tmp_path: Path) -> None:
    path = tmp_path / "fresh.journal"
    async with (
        Simulator(submit_time=0, processing_time=0.01, seed=5) as sim,
        client(sim) as kling,
    ):
        results = await asyncio.wait_for(
            collect(kling.extend_many(batch_requests(4), journal=path, concurrency=2)), BOUND
        )
        assert all(r.ok for r in results)
        assert lookups(sim) == []  # no GET by external id: only the creates, then polls
        assert sim.counters.creates == 4 and sim.counters.gets >= 4
        # A rerun of the finished journal answers from it, without a request.
        seen = sim.counters.requests
        again = await asyncio.wait_for(
            collect(kling.extend_many(batch_requests(4), journal=path)), BOUND
        )
        assert sim.counters.requests == seen and all(r.ok for r in again)


async def test_resumed_says_whether_the_journal_existed(tmp_path: Path) -> None:
    path = tmp_path / "unit.journal"
    journal = await Journal.open(path, service="http://127.0.0.1:1")
    try:
        assert journal.resumed is False

        def pragmas(db: sqlite3.Connection) -> dict[str, Any]:
            names = ("locking_mode", "journal_mode", "synchronous")
            return {name: db.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

        settings = await journal._run(pragmas)
        assert settings == {"locking_mode": "exclusive", "journal_mode": "wal", "synchronous": 2}
        await journal.record(
            0, fingerprint="fp", external_task_id=journal.external_id(0), state=PENDING
        )
        with pytest.raises(ValidationError, match="is in use by another run"):
            await Journal.open(path, service="http://127.0.0.1:1")
    finally:
        await journal.close()
    assert read_rows(path) == {0: PENDING}
    again = await Journal.open(path, service="http://127.0.0.1:1")
    try:
        assert again.resumed is True and again.batch_id == journal.batch_id
    finally:
        await again.close()
