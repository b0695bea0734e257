"""Tests of `kling_async.testing.Simulator` itself, with raw aiohttp (and http.client) calls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

import kling_async.testing
from kling_async.testing import FaultKind, ManualClock, Simulator
from tests.callback_receiver import Receiver

pytest_plugins = ["pytester"]

PATH = "/v1/videos/video-extend"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"simulator-test-webhook-secret-32").decode()


# -- helpers ------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sign_jwt(claims: dict[str, Any], secret: str) -> str:
    """HS256 by hand, so short secrets raise no InsecureKeyLengthWarning here."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def official_jwt(sim: Simulator, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": sim.access_key, "exp": now + 1800, "nbf": now - 5}
    claims.update(overrides)
    assert sim.secret_key is not None
    return sign_jwt({k: v for k, v in claims.items() if v is not None}, sim.secret_key)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None,
    body: Any = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = bearer(token) if token is not None else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if raw is not None:
        kwargs["data"] = raw
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    async with http.request(method, url, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def create(
    http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    payload = {"video_id": "743211632612511839", "prompt": "延长动画效果"}
    payload.update(body or {})
    return await call(http, "POST", sim.base_url + PATH, token=sim.api_key, body=payload)


async def get(http: aiohttp.ClientSession, sim: Simulator, key: str) -> tuple[int, dict[str, Any]]:
    return await call(http, "GET", f"{sim.base_url}{PATH}/{key}", token=sim.api_key)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) for something the simulator does in the background."""

    async def wait() -> None:
        while not condition():  # noqa: ASYNC110 - counters are plain ints, with no event
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), 5)


def assert_envelope(payload: dict[str, Any], code: int) -> None:
    assert payload["code"] == code
    assert isinstance(payload["message"], str)
    assert len(payload["request_id"]) == 36  # a uuid4


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(submit_time=0.05, processing_time=0.1, seed=7, file_size=4096) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def no_warning_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


# -- lifecycle and shapes -----------------------------------------------------------------


async def test_task_lifecycle(http: aiohttp.ClientSession) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    async with Simulator(submit_time=0.2, processing_time=0.3, seed=1, clock=clock) as sim:
        status, answer = await create(http, sim, {"external_task_id": "ext-1"})
        assert status == 200
        assert_envelope(answer, 0)
        data = answer["data"]
        assert data["task_status"] == "submitted"
        assert data["task_info"] == {"external_task_id": "ext-1"}  # official style
        task_id = data["task_id"]
        assert len(task_id) == 18
        assert task_id.isdigit()
        assert data["created_at"] == data["updated_at"]

        _, seen = await get(http, sim, task_id)
        assert seen["data"]["task_status"] == "submitted"
        assert "task_result" not in seen["data"]
        clock.advance(0.25)
        _, seen = await get(http, sim, task_id)
        assert seen["data"]["task_status"] == "processing"
        processing_since = seen["data"]["updated_at"]
        assert processing_since - data["created_at"] == 200
        clock.advance(0.25)
        _, seen = await get(http, sim, task_id)
        done = seen["data"]
        assert done["task_status"] == "succeed"
        assert done["task_status_msg"] == ""
        assert done["final_unit_deduction"] == "1"
        assert done["updated_at"] - data["created_at"] == 500
        parent = done["task_info"]["parent_video"]
        assert parent == {
            "id": "743211632612511839",
            "url": f"{sim.files_base_url}/files/743211632612511839.mp4",
            "duration": "5.1",
        }
        (video,) = done["task_result"]["videos"]
        assert 9.1 <= float(video["duration"]) <= 10.1
        assert video["url"] == f"{sim.files_base_url}/files/{video['id']}.mp4"
        assert sim.tasks[task_id].status == "succeed"

        # The result can be extended again: the chain grows.
        _, second = await create(http, sim, {"video_id": video["id"], "prompt": "p"})
        parent_again = sim.tasks[second["data"]["task_id"]].parent_video
        assert parent_again.duration == float(video["duration"])


async def test_failure_rate_and_finish_task(http: aiohttp.ClientSession) -> None:
    async with Simulator(submit_time=0, processing_time=0, failure_rate=1.0) as sim:
        _, answer = await create(http, sim)
        _, seen = await get(http, sim, answer["data"]["task_id"])
        assert seen["data"]["task_status"] == "failed"
        assert seen["data"]["task_status_msg"]
        assert seen["data"]["task_result"] == {"videos": []}

    async with Simulator(submit_time=30, processing_time=30) as sim:
        _, first = await create(http, sim, {"external_task_id": "a"})
        _, second = await create(http, sim)
        sim.finish_task("a")  # by external id
        sim.finish_task(second["data"]["task_id"], status="failed")
        _, seen = await get(http, sim, "a")
        assert seen["data"]["task_status"] == "succeed"
        _, seen = await get(http, sim, second["data"]["task_id"])
        assert seen["data"]["task_status"] == "failed"
        assert seen["data"]["task_status_msg"] == "Failure to pass the risk control system"
        sim.finish_task("a")  # same status again: nothing to do
        with pytest.raises(ValueError, match="already finished"):
            sim.finish_task("a", status="failed")
        with pytest.raises(KeyError):
            sim.finish_task("nope")
        with pytest.raises(ValueError, match="status"):
            sim.finish_task("a", status="processing")
        assert first["data"]["task_id"] in sim.tasks


async def test_seed_makes_runs_repeatable(http: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        async with Simulator(seed=42, failure_rate=0.5, submit_time=0, processing_time=0) as s:
            for _ in range(6):
                await create(http, s)
            runs.append([(t.task_id, t.outcome, t.result_video.duration) for t in s.tasks.values()])
    assert runs[0] == runs[1]


@pytest.mark.parametrize(("prefix", "official"), [("", True), ("/kling", False)])
async def test_both_prefixes_served(
    http: aiohttp.ClientSession, prefix: str, official: bool
) -> None:
    async with Simulator(prefix=prefix) as sim:
        assert sim.base_url == f"http://127.0.0.1:{sim.port}{prefix}"
        root = f"http://127.0.0.1:{sim.port}"
        for base in (root, root + "/kling"):
            status, answer = await call(
                http, "POST", base + PATH, token=sim.api_key, body={"video_id": "v1", "prompt": "p"}
            )
            assert status == 200
            assert ("task_info" in answer["data"]) is (base == root)
            status, _ = await call(http, "GET", base + PATH, token=sim.api_key)
            assert status == 200
        _, answer = await create(http, sim, {"external_task_id": "e"})
        assert ("task_info" in answer["data"]) is official
        status, answer = await call(http, "GET", root + "/v2/nothing", token=sim.api_key)
        assert (status, answer["code"]) == (404, 1202)


async def test_run_in_thread_reports_start_errors(sim: Simulator) -> None:
    with pytest.raises(OSError, match="address already in use"):  # noqa: SIM117
        with Simulator(port=sim.port).run_in_thread():
            pass  # pragma: no cover - the port is taken


def test_not_started() -> None:
    sim = Simulator()
    with pytest.raises(RuntimeError, match="not started"):
        _ = sim.base_url
    with pytest.raises(RuntimeError, match="not started"):
        _ = sim.files_base_url
    with pytest.raises(ValueError, match="prefix"):
        Simulator(prefix="kling/")


# -- auth ---------------------------------------------------------------------------------


async def test_auth_codes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = sim.base_url + PATH

    async def code_for(headers: dict[str, str]) -> tuple[int, int]:
        async with http.get(url, headers=headers) as response:
            return response.status, (await response.json())["code"]

    assert await code_for(bearer("sim-api-key")) == (200, 0)
    assert await code_for({}) == (401, 1001)
    assert await code_for({"Authorization": "Basic abc"}) == (401, 1002)
    assert await code_for(bearer("not-a-token")) == (401, 1002)
    assert await code_for(bearer(official_jwt(sim))) == (200, 0)
    assert await code_for(bearer(official_jwt(sim, nbf=None))) == (200, 0)
    assert await code_for(bearer(sign_jwt({"iss": "sim-access-key", "exp": 2**40}, "x"))) == (
        401,
        1002,
    )
    assert await code_for(bearer(official_jwt(sim, iss="someone-else"))) == (401, 1002)
    assert await code_for(bearer(official_jwt(sim, exp=None))) == (401, 1002)
    future = int(time.time()) + 60
    assert await code_for(bearer(official_jwt(sim, nbf=future))) == (401, 1003)
    assert await code_for(bearer(official_jwt(sim, exp=int(time.time()) - 1))) == (401, 1004)
    assert sim.counters.auth_failures == 8


async def test_jwt_only_and_key_only(http: aiohttp.ClientSession) -> None:
    async with Simulator(api_key=None) as sim:
        status, answer = await call(http, "GET", sim.base_url + PATH, token="sim-api-key")
        assert (status, answer["code"]) == (401, 1002)
    async with Simulator(access_key=None, secret_key=None) as sim:
        token = sign_jwt({"iss": "sim-access-key", "exp": 2**40}, "sim-secret-key")
        status, answer = await call(http, "GET", sim.base_url + PATH, token=token)
        assert (status, answer["code"]) == (401, 1002)


async def test_expire_tokens(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = sim.base_url + PATH
    old = official_jwt(sim)
    older = official_jwt(sim, nbf=int(time.time()) - 60)  # never sent before
    assert (await call(http, "GET", url, token=old))[0] == 200
    sim.expire_tokens()
    status, answer = await call(http, "GET", url, token=old)
    assert (status, answer["code"]) == (401, 1004)
    assert (await call(http, "GET", url, token=older))[1]["code"] == 1004
    fresh = official_jwt(sim, iat=time.time() + 1)
    assert (await call(http, "GET", url, token=fresh))[0] == 200
    assert (await call(http, "GET", url, token=sim.api_key))[0] == 200  # keys never expire


# -- account limits and validation --------------------------------------------------------


async def test_running_limit(http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    async with Simulator(
        running_limit=2, submit_time=0.05, processing_time=0.15, clock=clock
    ) as sim:
        assert (await create(http, sim))[0] == 200
        assert (await create(http, sim))[0] == 200
        status, answer = await create(http, sim)
        assert status == 429
        assert_envelope(answer, 1303)
        assert "data" not in answer  # like the real service
        assert sim.counters.rejected_1303 == 1
        assert sim.running_tasks == 2
        clock.advance(0.2)
        assert sim.running_tasks == 0
        assert (await create(http, sim))[0] == 200
        assert sim.counters.tasks_created == 3


async def test_credit(http: aiohttp.ClientSession) -> None:
    async with Simulator(credit=1, running_limit=0) as sim:
        # Credit is checked before the running limit.
        status, answer = await create(http, sim)
        assert (status, answer["code"]) == (429, 1303)
        sim.running_limit = None
        assert (await create(http, sim))[0] == 200
        status, answer = await create(http, sim)
        assert status == 429
        assert_envelope(answer, 1102)
        assert answer["data"] is None
        assert sim.counters.rejected_1102 == 1
        assert sim.counters.creates == 3


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({}, 1201, "video_id"),
        ({"prompt": "p", "video_id": ""}, 1201, "video_id"),
        ({"prompt": "p", "video_id": 5}, 1201, "video_id"),
        ({"prompt": "p", "video_id": "v", "cfg_scale": 1.5}, 1201, "cfg_scale"),
        ({"prompt": "p", "video_id": "v", "cfg_scale": True}, 1201, "cfg_scale"),
        ({"video_id": "v", "prompt": 3}, 1201, "prompt"),
        ({"prompt": "p", "video_id": "v", "callback_url": "ftp://x"}, 1201, "callback_url"),
        (
            {"prompt": "p", "video_id": "v", "watermark_info": {"enabled": "yes"}},
            1201,
            "watermark_info",
        ),
        ([1, 2], 1200, "JSON object"),
    ],
)
async def test_create_validation(
    sim: Simulator, http: aiohttp.ClientSession, body: Any, code: int, field: str
) -> None:
    status, answer = await call(http, "POST", sim.base_url + PATH, token=sim.api_key, body=body)
    assert status == 400
    assert_envelope(answer, code)
    assert field in answer["message"]
    assert answer["data"] is None
    assert sim.counters.tasks_created == 0


async def test_create_not_json_and_valid_options(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    url = sim.base_url + PATH
    status, answer = await call(http, "POST", url, token=sim.api_key, raw=b"{nope")
    assert (status, answer["code"]) == (400, 1200)
    options = {
        "negative_prompt": "blur",
        "cfg_scale": 0,
        "callback_url": "http://127.0.0.1:9/cb",
        "watermark_info": {"enabled": True},
        "task_id": "815336423632572487",
    }
    sim.drop_callbacks = True
    status, answer = await create(http, sim, options)
    assert status == 200
    task = sim.tasks[answer["data"]["task_id"]]
    assert task.parent_task_id == "815336423632572487"
    assert task.request["watermark_info"] == {"enabled": True}


async def test_video_too_long(http: aiohttp.ClientSession) -> None:
    async with Simulator(submit_time=0, processing_time=0, seed=3) as sim:
        video_id, steps = "start", 0
        while True:
            status, answer = await create(http, sim, {"video_id": video_id, "prompt": "p"})
            if status != 200:
                break
            _, seen = await get(http, sim, answer["data"]["task_id"])
            video_id = seen["data"]["task_result"]["videos"][0]["id"]
            steps += 1
        assert_envelope(answer, 1201)
        assert answer["message"] == "video duration exceeds 3 minutes"
        assert sim.videos[video_id].duration >= 180
        assert 35 <= steps <= 44


# -- get and list -------------------------------------------------------------------------


async def test_get_by_external_id_and_unknown(sim: Simulator, http: aiohttp.ClientSession) -> None:
    _, answer = await create(http, sim, {"external_task_id": "batch-7f3a-0001"})
    status, seen = await get(http, sim, "batch-7f3a-0001")
    assert status == 200
    assert seen["data"]["task_id"] == answer["data"]["task_id"]
    assert seen["data"]["task_info"]["external_task_id"] == "batch-7f3a-0001"
    status, missing = await get(http, sim, "nope")
    assert status == 404
    assert_envelope(missing, 1203)
    assert missing["data"] is None
    assert sim.counters.gets == 2
    assert sim.task_by_external_id("batch-7f3a-0001") is sim.tasks[answer["data"]["task_id"]]


async def test_list_paging(sim: Simulator, http: aiohttp.ClientSession) -> None:
    ids = [(await create(http, sim))[1]["data"]["task_id"] for _ in range(5)]
    url = sim.base_url + PATH

    async def page(query: str) -> list[str]:
        status, answer = await call(http, "GET", url + query, token=sim.api_key)
        assert status == 200
        return [task["task_id"] for task in answer["data"]]

    assert await page("?pageNum=1&pageSize=2") == ids[::-1][:2]
    assert await page("?pageNum=2&pageSize=2") == ids[::-1][2:4]
    assert await page("?pageNum=3&pageSize=2") == ids[:1]
    assert await page("?pageNum=4&pageSize=2") == []
    assert await page("") == ids[::-1]  # defaults: page 1 of 30
    for query in ("?pageSize=0", "?pageSize=501", "?pageNum=0", "?pageNum=x", "?pageSize=-1"):
        status, answer = await call(http, "GET", url + query, token=sim.api_key)
        assert (status, answer["code"]) == (400, 1201), query
    assert await page("?pageSize=500") == ids[::-1]
    assert sim.counters.lists == 11


# -- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "status", "code"), [("500", 500, 5000), ("503", 503, 5001)])
async def test_server_error_faults(
    sim: Simulator, http: aiohttp.ClientSession, kind: str, status: int, code: int
) -> None:
    sim.inject(kind, times=2)
    for _ in range(2):
        got, answer = await create(http, sim)
        assert got == status
        assert_envelope(answer, code)
    assert (await create(http, sim))[0] == 200
    assert sim.counters.tasks_created == 1
    assert sim.counters.faults_injected == 2


async def test_504_and_429_faults(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.inject(FaultKind.GATEWAY_TIMEOUT, on="get")
    sim.inject("429", on="any", retry_after=0.25)
    sim.inject("429", on="create", retry_after=3)
    sim.inject("429", on="list")
    status, answer = await get(http, sim, "x")
    assert (status, answer["code"]) == (504, 5002)
    async with http.post(
        sim.base_url + PATH, json={"video_id": "v", "prompt": "p"}, headers=bearer("sim-api-key")
    ) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "0.25"
        assert (await response.json())["code"] == 1302
    async with http.post(
        sim.base_url + PATH, json={"video_id": "v", "prompt": "p"}, headers=bearer("sim-api-key")
    ) as response:
        assert response.headers["Retry-After"] == "3"
    async with http.get(sim.base_url + PATH, headers=bearer("sim-api-key")) as response:
        assert response.status == 429
        assert "Retry-After" not in response.headers
    assert sim.pending_faults == 0
    assert sim.counters.tasks_created == 0


async def test_drop_before(
    sim: Simulator, http: aiohttp.ClientSession, no_warning_logs: None
) -> None:
    sim.inject("drop_before")
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await create(http, sim, {"external_task_id": "e1"})
    assert sim.counters.tasks_created == 0
    assert sim.counters.creates == 1
    assert (await get(http, sim, "e1"))[0] == 404


async def test_drop_after(
    sim: Simulator, http: aiohttp.ClientSession, no_warning_logs: None
) -> None:
    sim.inject("drop_after")
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await create(http, sim, {"external_task_id": "e1"})
    assert sim.counters.tasks_created == 1
    status, seen = await get(http, sim, "e1")
    assert status == 200
    assert seen["data"]["task_info"]["external_task_id"] == "e1"


async def test_slow_creates_task_before_answering(
    sim: Simulator, http: aiohttp.ClientSession, no_warning_logs: None
) -> None:
    sim.inject("slow", delay=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            sim.base_url + PATH,
            json={"video_id": "v", "prompt": "p", "external_task_id": "slow-1"},
            headers=bearer("sim-api-key"),
            timeout=aiohttp.ClientTimeout(total=0.1),
        ) as response:
            await response.read()
    assert sim.counters.tasks_created == 1
    assert sim.task_by_external_id("slow-1") is not None
    sim.inject("slow", on="get", delay=0.15)
    started = time.monotonic()
    assert (await get(http, sim, "slow-1"))[0] == 200
    assert time.monotonic() - started >= 0.15


async def test_html_and_truncated_bodies(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.inject("html")
    sim.inject("truncated")
    url = sim.base_url + PATH
    async with http.post(
        url, json={"video_id": "v", "prompt": "p"}, headers=bearer("sim-api-key")
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert b"<html>" in await response.read()
    async with http.post(
        url, json={"video_id": "v", "prompt": "p"}, headers=bearer("sim-api-key")
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.read()
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
        assert body.startswith(b'{"code":0')
    assert sim.counters.tasks_created == 2


async def test_short_body_on_the_api(
    sim: Simulator, http: aiohttp.ClientSession, no_warning_logs: None
) -> None:
    sim.inject("short_body", on="get")
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(http, sim, "x")


async def test_random_fault_rate(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_fault_rate(0.5, on="list", kinds=["500", "503"])
    statuses = []
    for _ in range(60):
        async with http.get(sim.base_url + PATH, headers=bearer("sim-api-key")) as response:
            statuses.append(response.status)
    faulted = sum(status != 200 for status in statuses)
    assert 15 <= faulted <= 45
    assert set(statuses) <= {200, 500, 503}
    assert sim.counters.faults_injected == faulted
    sim.set_fault_rate(0, on="list")
    async with http.get(sim.base_url + PATH, headers=bearer("sim-api-key")) as response:
        assert response.status == 200


def test_fault_arguments_are_checked() -> None:
    sim = Simulator()
    with pytest.raises(ValueError, match="fault kind"):
        sim.inject("teapot")
    with pytest.raises(ValueError, match="fault target"):
        sim.inject("500", on="everything")
    with pytest.raises(ValueError, match="times"):
        sim.inject("500", times=0)
    with pytest.raises(ValueError, match="rate"):
        sim.set_fault_rate(1.5)
    sim.inject("500", times=3)
    assert sim.pending_faults == 3
    sim.clear_faults()
    assert sim.pending_faults == 0


# -- files --------------------------------------------------------------------------------


async def finished_video_url(sim: Simulator, http: aiohttp.ClientSession) -> str:
    _, answer = await create(http, sim)
    task_id = answer["data"]["task_id"]
    sim.finish_task(task_id)
    _, seen = await get(http, sim, task_id)
    url: str = seen["data"]["task_result"]["videos"][0]["url"]
    return url


async def test_files_and_range(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = await finished_video_url(sim, http)
    assert url.startswith(sim.files_base_url + "/files/")
    assert not sim.base_url.startswith(sim.files_base_url)  # another origin
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "video/mp4"
        assert response.headers["Content-Length"] == "4096"
        content = await response.read()
    assert len(content) == 4096
    async with http.get(url, headers={"Range": "bytes=1000-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == "bytes 1000-4095/4096"
        assert await response.read() == content[1000:]
    async with http.get(url, headers={"Range": "bytes=5000-"}) as response:
        assert response.status == 416
    async with http.get(url) as response:
        assert await response.read() == content  # deterministic
    async with http.get(sim.files_base_url + "/files/424242.mp4") as response:
        assert response.status == 404
    files_requests = [r for r in sim.recent_requests if r.server == "files"]
    assert len(files_requests) == 5 == sim.counters.file_requests
    assert all("Authorization" not in r.headers for r in files_requests)
    assert files_requests[1].headers["range"] == "bytes=1000-"
    api_requests = [r for r in sim.recent_requests if r.server == "api"]
    assert api_requests[0].headers["Authorization"] == "Bearer sim-api-key"
    assert json.loads(api_requests[0].body)["video_id"] == "743211632612511839"


async def test_files_range_forms_and_faults(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = await finished_video_url(sim, http)
    async with http.get(url) as response:
        content = await response.read()
    for header, status, expected in [
        ("bytes=0-99", 206, content[:100]),
        ("bytes=-100", 206, content[-100:]),
        ("bytes=4000-9999", 206, content[4000:]),
        ("bytes=0-1,5-6", 200, content),  # several ranges: ignored, whole file
        ("pages=1-", 200, content),
    ]:
        async with http.get(url, headers={"Range": header}) as response:
            assert response.status == status, header
            assert await response.read() == expected
    for header in ("bytes=-0", "bytes=9-3"):
        async with http.get(url, headers={"Range": header}) as response:
            assert response.status == 416
            assert response.headers["Content-Range"] == "bytes */4096"
    sim.inject("429", on="files", retry_after=1)
    sim.inject("html", on="files")
    sim.inject("slow", on="files", delay=0.1)
    async with http.get(url) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
    async with http.get(url) as response:
        assert response.content_type == "text/html"
    started = time.monotonic()
    async with http.get(url) as response:
        assert await response.read() == content
    assert time.monotonic() - started >= 0.1
    async with http.head(url) as response:
        assert response.headers["Content-Length"] == "4096"
    async with http.get(sim.files_base_url + "/elsewhere") as response:
        assert response.status == 404


async def test_files_not_ready_until_success(http: aiohttp.ClientSession) -> None:
    async with Simulator(submit_time=30) as sim:
        _, answer = await create(http, sim)
        task = sim.tasks[answer["data"]["task_id"]]
        async with http.get(task.result_video.url) as response:
            assert response.status == 404
        async with http.get(task.parent_video.url) as response:
            assert response.status == 200
        status, answer = await create(http, sim, {"video_id": task.result_video.id, "prompt": "p"})
        assert (status, answer["code"]) == (400, 1201)
        assert "not available" in answer["message"]


async def test_files_short_body_and_drop(
    sim: Simulator, http: aiohttp.ClientSession, no_warning_logs: None
) -> None:
    url = await finished_video_url(sim, http)
    sim.inject("short_body", on="files")
    async with http.get(url) as response:
        assert response.headers["Content-Length"] == "4096"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    sim.inject("short_body", on="files")
    async with http.get(url, headers={"Range": "bytes=96-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Length"] == "4000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    # aiohttp (3.14) resends an idempotent request once when the server disconnects,
    # so a dropped GET must be dropped twice to reach the caller.
    sim.inject("drop_before", on="files", times=2)
    before = sim.counters.file_requests
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await http.get(url)
    assert sim.counters.file_requests == before + 2
    sim.inject("503", on="any")
    async with http.get(url) as response:
        assert response.status == 503
    async with http.get(url) as response:
        assert response.status == 200
        assert len(await response.read()) == 4096


# -- callbacks ----------------------------------------------------------------------------


async def test_signed_callbacks(
    http: aiohttp.ClientSession, receiver: tuple[Receiver, str]
) -> None:
    handler, url = receiver
    clock = ManualClock()
    async with Simulator(
        submit_time=60, processing_time=60, webhook_secret=WEBHOOK_SECRET, clock=clock
    ) as sim:
        _, answer = await create(http, sim, {"callback_url": url, "external_task_id": "cb-1"})
        await handler.wait_for(1)
        clock.advance(60)
        await handler.wait_for(2)
        clock.advance(60)
        await handler.wait_for(3)
        statuses = []
        ids = set()
        for headers, body in handler.received:
            payload = Webhook(WEBHOOK_SECRET).verify(body, headers)
            statuses.append(payload["task_status"])
            ids.add(headers["webhook-id"])
            assert payload["task_id"] == answer["data"]["task_id"]
            assert payload["task_info"]["external_task_id"] == "cb-1"
        assert statuses == ["submitted", "processing", "succeed"]
        assert len(ids) == 3
        assert handler.received[-1][1] == sim.recent_callbacks[-1].body
        final = json.loads(handler.received[-1][1])
        assert final["task_result"]["videos"][0]["duration"]
        assert sim.counters.callbacks_sent == 3
        assert sim.counters.callbacks_failed == 0


async def test_callback_on_finish_failures_and_drops(
    http: aiohttp.ClientSession, receiver: tuple[Receiver, str]
) -> None:
    handler, url = receiver
    async with Simulator(submit_time=30, processing_time=30) as sim:
        _, answer = await create(http, sim, {"callback_url": url})
        await handler.wait_for(1)
        assert "webhook-signature" not in handler.received[0][0]
        handler.status = 500
        sim.finish_task(answer["data"]["task_id"], status="failed")
        await handler.wait_for(2)
        assert json.loads(handler.received[1][1])["task_status"] == "failed"
        await until(lambda: sim.counters.callbacks_failed == 1)
        assert sim.counters.callbacks_sent == 1

        sim.drop_callbacks = True
        await create(http, sim, {"callback_url": url})
        sim.drop_callbacks = False
        await create(http, sim, {"callback_url": "http://127.0.0.1:9/unreachable"})
        await until(lambda: sim.counters.callbacks_failed == 2)
        assert sim.counters.callbacks_dropped == 1
        assert sim.counters.callbacks_failed == 2
        assert sim.recent_callbacks[-1].error is not None
        assert len(handler.received) == 2
    # close() cancelled the pending timers of the 30 s tasks: nothing left behind.
    pending = [t for t in asyncio.all_tasks() if "_deliver" in repr(t.get_coro())]
    assert pending == []


# -- counters, concurrency, close ---------------------------------------------------------


async def test_counters_and_peak_concurrency(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await create(http, sim, {"external_task_id": "dup"})
    await create(http, sim, {"external_task_id": "dup"})
    await create(http, sim, {"external_task_id": "single"})
    assert sim.counters.duplicate_external_ids == {"dup": 2}
    assert sim.counters.creates_by_external_id == {"dup": 2, "single": 1}
    sim.inject("slow", on="get", times=6, delay=0.2)
    await asyncio.gather(*(get(http, sim, "dup") for _ in range(6)))
    counters = sim.counters
    assert counters.peak_concurrent_requests >= 6
    assert counters.concurrent_requests == 0
    assert (counters.requests, counters.creates, counters.gets) == (9, 3, 6)
    snapshot = counters.as_dict()
    assert snapshot["duplicate_external_ids"] == {"dup": 2}
    counters.reset()
    assert counters.requests == counters.tasks_created == counters.peak_concurrent_requests == 0
    assert counters.creates_by_external_id == {}
    assert len(sim.tasks) == 3  # state is not reset, only counters


async def test_close_cuts_slow_answers_short(http: aiohttp.ClientSession) -> None:
    sim = Simulator()
    await sim.start()
    sim.inject("slow", delay=30)
    request = asyncio.ensure_future(create(http, sim))
    await until(lambda: sim.counters.tasks_created == 1)
    started = time.monotonic()
    await sim.close()
    await sim.close()  # twice is fine
    assert time.monotonic() - started < 2
    # The held-back answer is sent at once or the connection closes: either way, no wait.
    with contextlib.suppress(aiohttp.ClientError):
        await asyncio.wait_for(request, 1)
    with pytest.raises(RuntimeError, match="once"):
        await sim.start()


# -- threads and the pytest plugin --------------------------------------------------------


def sync_call(
    method: str, url: str, *, token: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """A blocking request with the standard library (no event loop in this thread)."""
    parts = urllib.parse.urlsplit(url)
    connection = HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        headers = {"Content-Type": "application/json", **bearer(token)}
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, parts.path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_run_in_thread() -> None:
    with Simulator(submit_time=30).run_in_thread() as sim:
        status, answer = sync_call(
            "POST", sim.base_url + PATH, token="sim-api-key", body={"video_id": "v", "prompt": "p"}
        )
        assert status == 200
        task_id = answer["data"]["task_id"]
        assert sim.tasks[task_id].status == "submitted"
        assert sim.running_tasks == 1
        sim.finish_task(task_id)  # marshalled onto the simulator's loop
        sim.expire_tokens()
        assert sim.tasks[task_id].status == "succeed"
        sim.inject("503", on="get")
        status, answer = sync_call("GET", f"{sim.base_url}{PATH}/{task_id}", token="k")
        assert (status, answer["code"]) == (503, 5001)
        url = sim.base_url
    with pytest.raises(ConnectionError):
        sync_call("GET", url + PATH, token="sim-api-key")


async def test_command_line_serves_until_sigterm(http: aiohttp.ClientSession) -> None:
    root = str(Path(kling_async.testing.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kling_async.testing",
        "--port",
        "0",
        "--processing-time",
        "3",
        "--api-key",
        "cli-key",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
            for _ in range(2)
        ]
        # A line a shell runs as it is, then the files' URL.
        assert lines[0].startswith("export KLING_BASE_URL=") and "KLING_API_KEY=" in lines[0]
        pairs = [pair for line in lines for pair in line.removeprefix("export ").split()]
        settings = dict(pair.split("=", 1) for pair in pairs)
        assert settings["KLING_API_KEY"] == "cli-key"
        assert settings["KLING_FILES_URL"].startswith("http://127.0.0.1:")
        status, answer = await call(
            http,
            "POST",
            settings["KLING_BASE_URL"] + PATH,
            token="cli-key",
            body={"video_id": "v", "prompt": "p"},
        )
        assert status == 200
        assert answer["data"]["task_status"] == "submitted"
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_pytest_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json, os, urllib.request

        import pytest

        pytest_plugins = ["kling_async.testing.pytest_plugin"]

        def test_env(kling_env):
            assert os.environ["KLING_BASE_URL"] == kling_env.base_url
            assert os.environ["KLING_API_KEY"] == "sim-api-key"
            assert "KLING_ACCESS_KEY" not in os.environ
            request = urllib.request.Request(
                os.environ["KLING_BASE_URL"] + "/v1/videos/video-extend",
                headers={"Authorization": "Bearer " + os.environ["KLING_API_KEY"]},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert json.loads(response.read())["code"] == 0

        def test_marker(kling_simulator):
            assert kling_simulator.running_limit is None

        def test_marker_kwargs(request):
            request.applymarker(pytest.mark.kling_simulator(running_limit=3, prefix="/kling"))
            sim = request.getfixturevalue("kling_simulator")
            assert sim.running_limit == 3
            assert sim.base_url.endswith("/kling")
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error", "--strict-markers"
    )
    result.assert_outcomes(passed=3)
