"""The simulator's clock, varied task times, remembered state and abandoned requests."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kling_async.testing
from kling_async import ExtendRequest, KlingClient, PollPolicy
from kling_async.testing import ManualClock, Simulator
from tests.callback_receiver import Receiver, serve_receiver

PATH = "/v1/videos/video-extend"
START = 1_700_000_000.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, sim: Simulator, method: str, tail: str = "", body: Any = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    async with http.request(method, sim.base_url + PATH + tail, headers=headers, json=body) as r:
        return r.status, await r.json()


async def create(
    http: aiohttp.ClientSession, sim: Simulator, **fields: Any
) -> tuple[int, dict[str, Any]]:
    return await call(
        http, sim, "POST", body={"video_id": "743211632612511839", "prompt": "p", **fields}
    )


async def status_of(http: aiohttp.ClientSession, sim: Simulator, key: str) -> dict[str, Any]:
    status, answer = await call(http, sim, "GET", "/" + key)
    assert status == 200, answer
    data: dict[str, Any] = answer["data"]
    return data


# -- ManualClock ---------------------------------------------------------------------------


def test_manual_clock() -> None:
    clock = ManualClock(start=START)
    assert clock() == START
    assert clock.advance(1.5) == START + 1.5
    assert clock.set(START + 10) == START + 10
    assert clock() == START + 10
    assert repr(clock) == f"ManualClock({START + 10!r})"
    with pytest.raises(ValueError, match="back"):
        clock.set(START)
    with pytest.raises(ValueError, match=">= 0"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="finite"):
        clock.advance(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        clock.set(float("inf"))
    with pytest.raises(ValueError, match="finite"):
        ManualClock(start=float("nan"))
    moves: list[float] = []
    unwatch = clock.watch(lambda: moves.append(clock()))
    clock.advance(1)
    unwatch()
    unwatch()  # twice is fine
    clock.advance(1)
    assert moves == [START + 11]
    assert abs(ManualClock()() - __import__("time").time()) < 60  # starts at the wall time


async def test_task_lifecycle_follows_the_clock(http: aiohttp.ClientSession) -> None:
    clock = ManualClock(start=START)
    async with Simulator(submit_time=2, processing_time=3, seed=1, clock=clock) as sim:
        status, answer = await create(http, sim, external_task_id="ext-1")
        assert status == 200
        created = answer["data"]
        assert created["task_status"] == "submitted"
        assert created["created_at"] == created["updated_at"] == int(START * 1000)
        task_id = created["task_id"]
        clock.advance(1.999)
        assert (await status_of(http, sim, task_id))["task_status"] == "submitted"
        assert sim.running_tasks == 1
        clock.advance(0.001)
        seen = await status_of(http, sim, task_id)
        assert seen["task_status"] == "processing"
        assert seen["updated_at"] == int((START + 2) * 1000)
        assert sim.tasks[task_id].status == "processing"  # the model reads the clock too
        clock.advance(3)
        done = await status_of(http, sim, "ext-1")
        assert done["task_status"] == "succeed"
        assert done["updated_at"] == int((START + 5) * 1000)
        assert sim.running_tasks == 0
        async with http.get(done["task_result"]["videos"][0]["url"]) as response:
            assert response.status == 200
        assert sim.recent_requests[-1].received_at == START + 5

        # finish_task stamps the clock's time.
        _, second = await create(http, sim)
        clock.advance(0.5)
        sim.finish_task(second["data"]["task_id"], status="failed")
        failed = await status_of(http, sim, second["data"]["task_id"])
        assert (failed["task_status"], failed["updated_at"]) == (
            "failed",
            int((START + 5.5) * 1000),
        )


async def test_running_limit_frees_when_the_clock_moves(http: aiohttp.ClientSession) -> None:
    clock = ManualClock(start=START)
    async with Simulator(running_limit=1, submit_time=1, processing_time=1, clock=clock) as sim:
        assert (await create(http, sim))[0] == 200
        assert (await create(http, sim))[1]["code"] == 1303
        clock.advance(2)
        assert (await create(http, sim))[0] == 200


async def test_jwt_expiry_reads_the_clock(http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    async with Simulator(clock=clock, seed=2) as sim:
        assert sim.access_key is not None
        assert sim.secret_key is not None
        async with KlingClient(
            access_key=sim.access_key, secret_key=sim.secret_key, base_url=sim.base_url
        ) as kling:
            await kling.list_tasks()  # signed on the wall clock, accepted
            clock.advance(3600)  # past the token's 30 minutes, by the simulator's clock
            status, answer = await call_with_token(http, sim, kling)
            assert (status, answer["code"]) == (401, 1004)


async def call_with_token(
    http: aiohttp.ClientSession, sim: Simulator, kling: KlingClient
) -> tuple[int, dict[str, Any]]:
    """Replay the client's last Authorization header (the same JWT) by hand."""
    header = next(r.headers["Authorization"] for r in reversed(sim.recent_requests))
    async with http.get(sim.base_url + PATH, headers={"Authorization": header}) as response:
        return response.status, await response.json()


async def test_callbacks_follow_the_manual_clock(
    http: aiohttp.ClientSession, receiver: tuple[Receiver, str]
) -> None:
    handler, url = receiver
    clock = ManualClock(start=START)
    # Hours of simulated time: the callbacks come as soon as the clock is moved.
    async with Simulator(submit_time=3600, processing_time=7200, clock=clock) as sim:
        await create(http, sim, callback_url=url)
        assert await handler.wait_for(1) == ["submitted"]
        clock.advance(3600)
        assert await handler.wait_for(2) == ["submitted", "processing"]
        clock.set(START + 3600 + 7200)
        assert await handler.wait_for(3) == ["submitted", "processing", "succeed"]
        assert sim.counters.callbacks_sent == 3


def test_callbacks_follow_the_manual_clock_in_a_thread() -> None:
    clock = ManualClock(start=START)
    with Simulator(submit_time=60, processing_time=60, clock=clock).run_in_thread() as sim:
        done = asyncio.run(_create_and_receive(sim, clock))
    assert done == ["submitted", "succeed"] or done == ["submitted", "processing", "succeed"]


async def _create_and_receive(sim: Simulator, clock: ManualClock) -> list[str]:
    async with serve_receiver() as (handler, url):
        async with aiohttp.ClientSession() as http:
            await create(http, sim, callback_url=url)
        await handler.wait_for(1)
        clock.advance(120)  # moved from another thread than the simulator's
        return list(await handler.wait_for(3))


# -- varied task times ---------------------------------------------------------------------


async def test_time_spread(http: aiohttp.ClientSession) -> None:
    clock = ManualClock(start=START)
    async with Simulator(
        submit_time=10, processing_time=100, time_spread=0.5, seed=3, clock=clock
    ) as sim:
        for _ in range(40):
            await create(http, sim)
        tasks = list(sim.tasks.values())
    submits = [t.submit_time for t in tasks]
    processing = [t.processing_time for t in tasks]
    assert all(5 <= s <= 15 for s in submits)
    assert all(50 <= p <= 150 for p in processing)
    assert max(submits) - min(submits) > 5  # varied, not all alike
    assert max(processing) - min(processing) > 50
    assert min(submits) < 10 < max(submits)

    # Seeded: the same times again, and the outcomes and ids as without a spread.
    async with Simulator(
        submit_time=10, processing_time=100, time_spread=0.5, seed=3, clock=clock
    ) as again:
        for _ in range(40):
            await create(http, again)
        assert [t.submit_time for t in again.tasks.values()] == submits
    async with Simulator(submit_time=10, processing_time=100, seed=3, clock=clock) as plain:
        for _ in range(40):
            await create(http, plain)
        assert list(plain.tasks) == [t.task_id for t in tasks]
        assert {t.submit_time for t in plain.tasks.values()} == {10}  # default 0: no spread


def test_time_spread_is_checked() -> None:
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="time_spread"):
            Simulator(time_spread=bad)


# -- abandoned requests --------------------------------------------------------------------


async def test_abandoned_requests_do_not_count_as_concurrent() -> None:
    async with Simulator(seed=4, submit_time=0, processing_time=0) as sim:
        async with KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            max_in_flight=2,
            timeout=0.2,
            max_retries=3,
        ) as kling:
            task = await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
            sim.counters.reset()
            # Answers held back 1 s: the client gives up on each after 0.2 s and retries,
            # while the simulator's handler still sleeps on the abandoned one.
            sim.inject("slow", on="get", times=5, delay=1.0)
            seen = await asyncio.gather(*(kling.get_task(task.task_id) for _ in range(4)))
        assert all(t.task_id == task.task_id for t in seen)
        assert sim.counters.faults_injected == 5
        assert sim.counters.peak_concurrent_requests <= 2
        assert sim.counters.peak_concurrent_requests == 2  # the limit was reached
        assert sim.counters.concurrent_requests == 0


async def test_a_slow_answer_ends_when_the_client_goes(http: aiohttp.ClientSession) -> None:
    async with Simulator(latency=0) as sim:
        sim.inject("slow", on="list", delay=30)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call(http, sim, "GET"), 0.2)
        # The handler notices the closed connection and stops holding its slot.
        for _ in range(200):
            if sim.counters.concurrent_requests == 0:
                break
            await asyncio.sleep(0.01)
        assert sim.counters.concurrent_requests == 0


# -- remembered state ----------------------------------------------------------------------


async def test_state_survives_a_restart(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    clock = ManualClock(start=START)
    options: dict[str, Any] = {
        "submit_time": 10,
        "processing_time": 20,
        "seed": 5,
        "clock": clock,
        "state_path": state,
        "credit": 3,
    }
    async with Simulator(**options) as first:
        _, a = await create(http, first, external_task_id="row-1")
        _, b = await create(http, first, external_task_id="row-2")
        first.finish_task("row-2", status="failed")
        base_url, files_url = first.base_url, first.files_base_url
        assert json.loads(state.read_text())["store"]["created_total"] == 2  # saved at create
    task_a, task_b = a["data"]["task_id"], b["data"]["task_id"]

    clock.advance(15)  # time passes while the simulator is down
    async with Simulator(**options) as second:
        assert (second.base_url, second.files_base_url) == (base_url, files_url)
        seen = await status_of(http, second, task_a)
        assert seen["task_status"] == "processing"  # created before, 15 s into its 30
        assert seen["task_info"]["external_task_id"] == "row-1"
        assert (await status_of(http, second, "row-1"))["task_id"] == task_a
        assert (await status_of(http, second, "row-2"))["task_status"] == "failed"
        assert second.task_by_external_id("row-2") is second.tasks[task_b]
        clock.advance(15)
        done = await status_of(http, second, task_a)
        assert done["task_status"] == "succeed"
        assert done["updated_at"] == int((START + 30) * 1000)  # on time across the restart
        async with http.get(done["task_result"]["videos"][0]["url"]) as response:
            assert response.status == 200
        # Creating an external id again is a duplicate, and the credit remembers two tasks.
        _, c = await create(http, second, external_task_id="row-1")
        assert c["data"]["task_id"] not in (task_a, task_b)
        assert second.counters.duplicate_external_ids == {"row-1": 2}
        assert (await create(http, second))[1]["code"] == 1102
        # The result can be extended again after the restart.
        result_id = done["task_result"]["videos"][0]["id"]
        second.credit = None
        assert (await create(http, second, video_id=result_id))[0] == 200

    async with Simulator(**options) as third:
        assert len(third.tasks) == 4
        assert third.tasks[task_a].status == "succeed"
    assert os.listdir(tmp_path) == ["sim.json"]  # no temporary file left behind


async def test_a_taken_port_falls_back(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    async with Simulator(state_path=state) as first:
        port = first.port
    # Someone else listens there now.
    async with Simulator(port=port), Simulator(state_path=str(state)) as second:
        assert second.port != port
        assert (await create(http, second))[0] == 200
    assert json.loads(state.read_text())["api_port"] == second.port


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a simulator state file"),
        (b'{"format": "something-else"}', "not a simulator state file"),
        (b'{"format": "kling-async-simulator-state", "version": 99}', "version 99"),
        (b'{"format": "kling-async-simulator-state", "version": 1, "store": 3}', "damaged"),
        (
            b'{"format": "kling-async-simulator-state", "version": 1, "api_port": 0,'
            b' "files_port": null, "store": {}}',
            "damaged",
        ),
        (
            b'{"format": "kling-async-simulator-state", "version": 1, "api_port": null,'
            b' "files_port": null, "store": {"videos": [], "tasks": [{"task_id": 1}]}}',
            "damaged",
        ),
    ],
)
async def test_a_bad_state_file_is_refused_and_kept(
    tmp_path: Path, content: bytes, message: str
) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(content)
    sim = Simulator(state_path=state)
    with pytest.raises(ValueError, match=message) as info:
        await sim.start()
    assert str(state) in str(info.value)
    assert state.read_bytes() == content  # never overwritten
    await sim.close()
    assert state.read_bytes() == content


async def test_an_unreadable_state_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read") as info:
        await Simulator(state_path=tmp_path).start()  # a directory
    assert str(tmp_path) in str(info.value)


async def test_state_with_the_client_and_a_restart(tmp_path: Path) -> None:
    """A client's wait resumes across a simulator restart: the same task, created once."""
    state = tmp_path / "sim.json"
    clock = ManualClock()
    options: dict[str, Any] = {"submit_time": 5, "processing_time": 5, "clock": clock}
    fast = PollPolicy(initial=0.01, max_interval=0.05)
    sim = Simulator(state_path=state, **options)
    async with sim, KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=fast) as kling:
        task = await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
    clock.advance(10)
    async with Simulator(state_path=state, **options) as sim:
        async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=fast) as kling:
            done = await kling.wait_for_task(task)
        assert done.succeeded
        assert sim.counters.tasks_created == 0


async def test_command_line_state_and_spread(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    state = tmp_path / "cli-state.json"
    settings = await _serve_once(http, state, ["--time-spread", "0.5", "--seed", "1"])
    again = await _serve_once(http, state, [])
    assert again["KLING_BASE_URL"] == settings["KLING_BASE_URL"]
    saved = json.loads(state.read_text())
    assert len(saved["store"]["tasks"]) == 2
    first, second = saved["store"]["tasks"]
    assert first["submit_time"] != 0.5  # drawn from 0.25..0.75
    assert 0.25 <= first["submit_time"] <= 0.75
    assert second["submit_time"] == 0.5

    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    process = await asyncio.create_subprocess_exec(
        *_command(["--state", str(bad)]), stderr=asyncio.subprocess.PIPE, env=_env()
    )
    _, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert str(bad) in err.decode()
    process = await asyncio.create_subprocess_exec(
        *_command(["--time-spread", "1"]), stderr=asyncio.subprocess.PIPE, env=_env()
    )
    _, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert "--time-spread" in err.decode()


def _env() -> dict[str, str]:
    root = str(Path(kling_async.testing.__file__).parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "kling_async.testing", "--port", "0", *args]


async def _serve_once(http: aiohttp.ClientSession, state: Path, args: list[str]) -> dict[str, str]:
    process = await asyncio.create_subprocess_exec(
        *_command(["--state", str(state), *args]), stdout=asyncio.subprocess.PIPE, env=_env()
    )
    try:
        assert process.stdout is not None
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
            for _ in range(2)
        ]
        pairs = [pair for line in lines for pair in line.removeprefix("export ").split()]
        settings = dict(pair.split("=", 1) for pair in pairs)
        headers = {"Authorization": "Bearer sim-api-key"}
        url = settings["KLING_BASE_URL"] + PATH
        async with http.post(
            url, json={"video_id": "v", "prompt": "p"}, headers=headers
        ) as response:
            assert response.status == 200
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return settings
