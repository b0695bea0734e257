"""KlingClient against the simulator over real sockets: faults, exactly-once, limits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async import (
    APIConnectionError,
    APITimeoutError,
    ConfigurationError,
    ExtendRequest,
    InsufficientBalanceError,
    KlingClient,
    NotFoundError,
    ResponseFormatError,
    ServerError,
    Task,
    TaskFailedError,
    TaskStatus,
    ValidationError,
    WaitTimeoutError,
)
from kling_async.testing import Simulator
from tests.conftest import FAST_POLL
from tests.test_protocol import SERVICE_CODES

REQUEST = ExtendRequest(video_id="828006748715380777", prompt="延长动画效果", cfg_scale=0.5)

CREATE_FAULTS = [
    "500",
    "503",
    "504",
    "429",
    "drop_before",
    "drop_after",
    "slow",
    "html",
    "truncated",
]


def waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [r.kling_wait for r in caplog.records if hasattr(r, "kling_wait")]


# -- basics ------------------------------------------------------------------------------


async def test_extend_and_wait(client: KlingClient, sim: Simulator) -> None:
    task = await client.extend(REQUEST)
    assert task.status is TaskStatus.SUBMITTED
    assert task.external_task_id  # set by the client, kept even if the answer omits it
    done = await client.wait_for_task(task)
    assert done.succeeded and done.videos
    assert done.videos[0].duration > 5.1
    assert sim.counters.tasks_created == 1
    body = next(r for r in sim.recent_requests if r.method == "POST").body
    assert b'"cfg_scale":0.5' in body and b"external_task_id" in body


async def test_extend_video_with_gateway_prefix() -> None:
    async with Simulator(prefix="/kling", submit_time=0, processing_time=0.01) as sim:
        assert sim.base_url.endswith("/kling")
        async with KlingClient(
            api_key=sim.api_key, base_url=sim.base_url + "/", poll=FAST_POLL
        ) as kling:
            task = await kling.extend_video(
                "v1", "p", watermark=False, parent_task_id="t0", external_task_id="mine-1"
            )
            assert task.external_task_id == "mine-1"
            done = await kling.extend_and_wait(ExtendRequest(video_id="v1", prompt="again"))
            assert done.succeeded
        assert all(
            r.path.startswith("/kling/v1/") for r in sim.recent_requests if r.server == "api"
        )


async def test_get_task_by_either_id(client: KlingClient) -> None:
    task = await client.extend(ExtendRequest(video_id="v", prompt="p", external_task_id="ext-7"))
    by_id = await client.get_task(task.task_id)
    by_external = await client.get_task(external_task_id="ext-7")
    assert by_id.task_id == by_external.task_id == task.task_id
    assert by_id.request_id
    with pytest.raises(ValidationError, match="exactly one"):
        await client.get_task()
    with pytest.raises(ValidationError, match="exactly one"):
        await client.get_task("a", external_task_id="b")
    with pytest.raises(ValidationError, match="task_id"):
        await client.get_task("  ")
    with pytest.raises(NotFoundError):
        await client.get_task("no-such-task")


async def test_list_and_iter_tasks(client: KlingClient) -> None:
    created = [await client.extend(REQUEST) for _ in range(5)]
    page = await client.list_tasks(page=1, page_size=2)
    assert len(page) == 2
    everything = [t async for t in client.iter_tasks(page_size=2)]
    assert {t.task_id for t in everything} == {t.task_id for t in created}
    for bad in (0, 501, True, "2"):
        with pytest.raises(ValidationError, match="page_size"):
            await client.list_tasks(page_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="page"):
        await client.list_tasks(page=0)


async def test_extend_rejects_other_types(client: KlingClient) -> None:
    with pytest.raises(ValidationError, match="request"):
        await client.extend({"video_id": "v"})  # type: ignore[arg-type]


# -- faults: exactly-once creation -------------------------------------------------------------


@pytest.mark.parametrize("kind", CREATE_FAULTS)
async def test_each_fault_on_create_still_creates_exactly_one_task(
    kind: str, sim: Simulator
) -> None:
    sim.inject(kind, on="create", retry_after=0.01, delay=1.0)
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, timeout=0.3, poll=FAST_POLL
    ) as kling:
        task = await kling.extend(REQUEST)
        assert await kling.wait_for_task(task)
    assert sim.counters.tasks_created == 1
    assert sim.counters.creates_by_external_id == {task.external_task_id: 1}
    assert not sim.counters.duplicate_external_ids


@pytest.mark.parametrize("kind", CREATE_FAULTS)
async def test_each_fault_on_polls_does_not_end_the_wait(kind: str, sim: Simulator) -> None:
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, timeout=0.3, poll=FAST_POLL
    ) as kling:
        task = await kling.extend(REQUEST)
        sim.inject(kind, on="get", times=2, retry_after=0.01, delay=1.0)
        done = await kling.wait_for_task(task.task_id)
        assert done.succeeded
        sim.inject(kind, on="get", retry_after=0.01, delay=1.0)
        assert (await kling.get_task(task.task_id)).succeeded
    assert sim.counters.tasks_created == 1


async def test_repeated_ambiguous_failures_never_duplicate(sim: Simulator) -> None:
    sim.inject("drop_after", on="create", times=2)
    sim.inject("500", on="get")  # the first look-up fails too
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, max_retries=6) as kling:
        tasks = await asyncio.gather(*(kling.extend(REQUEST) for _ in range(3)))
    assert len({t.task_id for t in tasks}) == 3
    assert sim.counters.tasks_created == 3
    assert not sim.counters.duplicate_external_ids


async def test_drop_before_creates_then_submits_after_404(sim: Simulator) -> None:
    sim.inject("drop_before", on="create")
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling:
        task = await kling.extend(REQUEST)
    # Looked up (again, if the first look came before the dropped request could no
    # longer arrive) before the create is sent again.
    lookups = [r.path for r in sim.recent_requests if r.method == "GET"]
    assert lookups and set(lookups) == {f"/v1/videos/video-extend/{task.external_task_id}"}
    assert sim.counters.creates == 2 and sim.counters.tasks_created == 1


async def test_retries_run_out(sim: Simulator) -> None:
    sim.inject("503", on="create", times=10)
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, max_retries=2) as kling:
        with pytest.raises(ServerError) as caught:
            await kling.extend(REQUEST)
    assert caught.value.status == 503 and caught.value.code == 5001
    assert sim.counters.creates == 3  # one try and two retries (with look-ups between)
    assert sim.counters.tasks_created == 0


async def test_no_credit_is_tried_exactly_once() -> None:
    async with (
        Simulator(credit=0) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling,
    ):
        with pytest.raises(InsufficientBalanceError) as caught:
            await kling.extend(REQUEST)
        assert caught.value.code == 1102
        assert sim.counters.requests == 1


async def test_slow_answers_time_out_as_our_error(sim: Simulator) -> None:
    sim.inject("slow", on="get", times=10, delay=1.0)
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, timeout=0.1, max_retries=1
    ) as kling:
        with pytest.raises(APITimeoutError) as caught:
            await kling.get_task("anything")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "GET /v1/videos/video-extend/anything" in str(caught.value)


async def test_connection_refused_is_our_error() -> None:
    async with Simulator() as sim:
        url = sim.base_url
    async with KlingClient(api_key="k", base_url=url, max_retries=1) as kling:
        with pytest.raises(APIConnectionError) as caught:
            await kling.get_task("x")
    assert caught.value.sent is False


# -- every service code over a real socket ---------------------------------------------------


@pytest.fixture
async def coded_server() -> AsyncIterator[Callable[..., Awaitable[tuple[str, list[int]]]]]:
    """A tiny server that answers every request with one status, code and header."""
    runners: list[web.AppRunner] = []

    async def start(
        status: int, code: int, headers: dict[str, str] | None = None, then_ok: bool = False
    ) -> tuple[str, list[int]]:
        seen: list[int] = []

        async def handle(request: web.Request) -> web.Response:
            seen.append(1)
            if then_ok and len(seen) > 1:
                return web.json_response(
                    {
                        "code": 0,
                        "message": "ok",
                        "request_id": "r",
                        "data": {"task_id": "1", "task_status": "succeed"},
                    }
                )
            return web.json_response(
                {"code": code, "message": f"code {code}", "request_id": "rid"},
                status=status,
                headers=headers,
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", seen

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(("status", "code", "cls", "retried"), SERVICE_CODES)
async def test_every_service_code_over_the_wire(
    coded_server: Callable[..., Awaitable[tuple[str, list[int]]]],
    status: int,
    code: int,
    cls: type[Exception],
    retried: bool,
) -> None:
    url, seen = await coded_server(status, code, {"Retry-After": "0"})
    async with KlingClient(api_key="k", base_url=url, max_retries=2) as kling:
        with pytest.raises(cls) as caught:
            await kling.get_task("t")
    assert type(caught.value) is cls
    expected = 3 if retried else 1
    if code == 1004:
        expected = 1  # a bearer key cannot be re-signed
    assert len(seen) == expected


async def test_retry_after_is_honoured_exactly(
    coded_server: Callable[..., Awaitable[tuple[str, list[int]]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    url, _ = await coded_server(503, 5001, {"Retry-After": "0.2"}, then_ok=True)
    async with KlingClient(api_key="k", base_url=url) as kling:
        await kling.get_task("t")
    assert waits(caplog) == [0.2]


async def test_a_429_waits_at_least_a_second_whatever_retry_after_says(
    coded_server: Callable[..., Awaitable[tuple[str, list[int]]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    url, _ = await coded_server(429, 1302, {"Retry-After": "0.2"}, then_ok=True)
    async with KlingClient(api_key="k", base_url=url) as kling:
        await kling.get_task("t")
    assert waits(caplog) == [1.0]


async def test_retry_after_http_date_and_cap(
    coded_server: Callable[..., Awaitable[tuple[str, list[int]]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    # An HTTP-date in the past means "now": wait 0.
    url, _ = await coded_server(
        503, 5001, {"Retry-After": formatdate(0, usegmt=True)}, then_ok=True
    )
    async with KlingClient(api_key="k", base_url=url) as kling:
        await kling.get_task("t")
    assert waits(caplog) == [0.0]


async def test_simulator_retry_after_and_backoff_waits(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    sim.inject("429", on="create", retry_after=0.15)
    sim.inject("500", on="get")
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling:
        task = await kling.extend(REQUEST)
        await kling.get_task(task.task_id)
    recorded = waits(caplog)
    assert recorded[0] == 1.0  # a 429's Retry-After of 0.15 s is raised to Kling's 1 s
    assert 0 <= recorded[1] <= 0.5  # full jitter of the first backoff step


# -- limits ------------------------------------------------------------------------------------


async def test_max_in_flight_holds_with_200_concurrent_calls() -> None:
    async with Simulator(latency=0.01, submit_time=0, processing_time=0, seed=2) as sim:
        # (No 429: it is retried a second later at the earliest, and this is about the
        # limit on open requests, not about waiting.)
        sim.set_fault_rate(0.2, on="any", kinds=["500", "drop_before"], retry_after=0)
        async with KlingClient(
            api_key=sim.api_key, base_url=sim.base_url, max_in_flight=5, max_retries=10
        ) as kling:
            tasks = await asyncio.gather(*(kling.extend(REQUEST) for _ in range(200)))
            await asyncio.gather(*(kling.get_task(t.task_id) for t in tasks))
        assert 1 < sim.counters.peak_concurrent_requests <= 5
        assert sim.counters.tasks_created == 200
        assert not sim.counters.duplicate_external_ids
        sim.clear_faults()
        sim.counters.reset()
        # The same load with a looser limit does go wider: the measurement can fail.
        async with KlingClient(
            api_key=sim.api_key, base_url=sim.base_url, max_in_flight=50
        ) as kling:
            await asyncio.gather(*(kling.get_task(t.task_id) for t in tasks))
        assert sim.counters.peak_concurrent_requests > 5


# -- credentials never leak -------------------------------------------------------------------


async def test_credentials_appear_nowhere(debug_log: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-secret-key"
    async with Simulator(
        api_key="bearer-key-123",
        access_key="access-1",
        secret_key=secret,
        submit_time=0,
        processing_time=0.01,
    ) as sim:
        sim.inject("500", on="create")
        sim.inject("drop_after", on="get")
        errors: list[BaseException] = []
        for kwargs in (
            {"api_key": "bearer-key-123"},
            {"access_key": "access-1", "secret_key": secret},
        ):
            kling = KlingClient(base_url=sim.base_url, poll=FAST_POLL, max_retries=1, **kwargs)
            texts = [repr(kling), str(kling)]
            async with kling:
                task = await kling.extend(REQUEST)
                await kling.wait_for_task(task)
                for call in (kling.get_task("missing"), kling.list_tasks(page_size=999)):
                    try:
                        await call
                    except Exception as error:
                        errors.append(error)
            texts.append(repr(kling))
        tokens = {r.headers.get("Authorization", "") for r in sim.recent_requests}
        jwts = {t.removeprefix("Bearer ") for t in tokens if t.count(".") == 2}
        assert jwts
        texts += [repr(e) for e in errors] + [str(e) for e in errors]
        texts += [r.getMessage() for r in debug_log.records]
        texts += [str(r.__dict__) for r in debug_log.records]
        haystack = "\n".join(texts)
        for needle in ("bearer-key-123", secret, *jwts):
            assert needle not in haystack
        assert any(r.levelno == logging.DEBUG for r in debug_log.records)


async def test_authorization_goes_only_to_the_api_origin(sim: Simulator) -> None:
    # A redirect to another origin is not followed (it would carry the key along).
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(sim.files_base_url + "/files/x.mp4")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with KlingClient(api_key="k-redirect", base_url=url, max_retries=0) as kling:
            with pytest.raises(Exception) as caught:  # noqa: PT011
                await kling.get_task("t")
        assert "k-redirect" not in repr(caught.value)
        assert not [r for r in sim.recent_requests if r.server == "files"]
    finally:
        await runner.cleanup()


# -- configuration and lifecycle ------------------------------------------------------------------


def test_missing_credentials_name_the_variables() -> None:
    with pytest.raises(ConfigurationError) as caught:
        KlingClient()
    for name in ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
        assert name in str(caught.value)
    with pytest.raises(ConfigurationError, match="secret_key"):
        KlingClient(access_key="a")


def test_environment_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_ACCESS_KEY", "ak")
    monkeypatch.setenv("KLING_SECRET_KEY", "sk-env-secret")
    monkeypatch.setenv("KLING_BASE_URL", "https://gateway.example.com/kling/")
    kling = KlingClient()
    assert kling.base_url == "https://gateway.example.com/kling"
    assert "sk-env-secret" not in repr(kling) and "access_key" in repr(kling)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:1", True),
        ("http://[::1]:80/kling", True),
        ("http://gateway.example.com", False),
        ("ftp://x.example.com", False),
        ("https://user:pw@x.example.com", False),
        ("not a url", False),
    ],
)
def test_base_url_rules(url: str, ok: bool) -> None:
    if ok:
        KlingClient(api_key="k", base_url=url)
    else:
        with pytest.raises(ConfigurationError) as caught:
            KlingClient(api_key="k", base_url=url)
        assert "pw" not in str(caught.value)


def test_allow_insecure() -> None:
    KlingClient(api_key="k", base_url="http://gateway.example.com", allow_insecure=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_in_flight": 0},
        {"max_retries": -1},
        {"timeout": 0},
        {"max_in_flight": True},
        {"poll": 3},
        {"api_key": ""},
    ],
)
def test_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        KlingClient(**{"api_key": "k", **kwargs})


async def test_injected_session_is_never_closed(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as session:
        async with KlingClient(
            api_key=sim.api_key, base_url=sim.base_url, session=session
        ) as kling:
            await kling.extend(REQUEST)
        await kling.aclose()
        assert not session.closed


async def test_close_is_idempotent_and_final(sim: Simulator) -> None:
    kling = KlingClient(api_key=sim.api_key, base_url=sim.base_url)  # no session yet
    await kling.extend(REQUEST)
    await kling.aclose()
    await kling.aclose()
    assert "closed" in repr(kling)
    with pytest.raises(RuntimeError, match="closed"):
        await kling.get_task("x")


def test_client_can_be_built_outside_a_loop() -> None:
    KlingClient(api_key="k")


# -- waiting ---------------------------------------------------------------------------------------


async def test_on_update_sync_and_async(client: KlingClient) -> None:
    seen: list[str] = []
    seen_async: list[str] = []

    async def record(task: Task) -> None:
        seen_async.append(task.raw_status)

    task = await client.extend(REQUEST)
    await client.wait_for_task(task, on_update=lambda t: seen.append(t.raw_status))
    assert seen[-1] == "succeed" and len(seen) == len(set(seen))
    await client.extend_and_wait(REQUEST, on_update=record)
    assert seen_async[0] == "submitted" and seen_async[-1] == "succeed"


async def test_failed_task_raises_with_the_task() -> None:
    async with (
        Simulator(failure_rate=1.0, submit_time=0, processing_time=0.01) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        with pytest.raises(TaskFailedError) as caught:
            await kling.extend_and_wait(REQUEST)
    assert caught.value.task.failed
    assert caught.value.task.status_message


async def test_wait_timeout_carries_the_last_state() -> None:
    async with (
        Simulator(submit_time=0, processing_time=30) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        task = await kling.extend(REQUEST)
        with pytest.raises(WaitTimeoutError) as caught:
            await kling.wait_for_task(task, timeout=0.2)
        assert caught.value.task.status is TaskStatus.PROCESSING
        with pytest.raises(WaitTimeoutError) as caught:
            await kling.wait_for_task(task.task_id, timeout=0)
        with pytest.raises(ValidationError):
            await kling.wait_for_task(task, timeout=-1)
        with pytest.raises(ValidationError):
            await kling.wait_for_task(42)  # type: ignore[arg-type]


async def test_a_wait_that_times_out_carries_the_last_poll_not_the_last_change() -> None:
    # Polls that only repeat the status are not parsed on the way; the one a timeout
    # ends on still is: `WaitTimeoutError.task` is the task as last seen (its own
    # answer's request id), not as it was when it took that status.
    async with (
        Simulator(submit_time=0, processing_time=600) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        task = await kling.extend(REQUEST)
        changes: list[Task] = []
        with pytest.raises(WaitTimeoutError) as caught:
            await kling.wait_for_task(task, timeout=2.0, on_update=changes.append)
    polls = [r for r in sim.recent_requests if r.method == "GET" and task.task_id in r.path]
    assert len(polls) >= 2  # two seconds of polls a tenth of a second apart at most
    last = caught.value.task
    assert last.status is TaskStatus.PROCESSING
    assert last.request_id is not None
    # Neither the create's answer nor the poll that saw the task start processing.
    assert last.request_id not in {task.request_id, *(c.request_id for c in changes)}


async def test_wait_ends_on_non_retryable_errors(client: KlingClient) -> None:
    with pytest.raises(NotFoundError):
        await client.wait_for_task("no-such-task")


async def test_wait_survives_an_outage(sim: Simulator) -> None:
    async with KlingClient(
        api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, max_retries=0
    ) as kling:
        task = await kling.extend(REQUEST)
        sim.inject("503", on="get", times=4)
        assert (await kling.wait_for_task(task)).succeeded


async def test_format_errors_inside_the_envelope_are_not_retried(
    coded_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(1)
        return web.json_response({"code": 0, "message": "", "data": {"task_id": 5}})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with KlingClient(api_key="k", base_url=url) as kling:
            with pytest.raises(ResponseFormatError) as caught:
                await kling.get_task("t")
        assert caught.value.path == "data.task_id"
        assert len(seen) == 1
    finally:
        await runner.cleanup()


async def test_debug_log_lines_carry_the_attempt(
    sim: Simulator, debug_log: pytest.LogCaptureFixture
) -> None:
    sim.inject("503", on="get")
    sim.inject("drop_before", on="get", times=2)  # aiohttp re-sends a GET once by itself
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling:
        task = await kling.extend(REQUEST)
        await kling.get_task(task.task_id)
    lines = [r for r in debug_log.records if getattr(r, "kling_method", None) == "GET"]
    assert [(r.kling_status, r.kling_attempt) for r in lines] == [
        (503, 1),
        ("APIConnectionError", 2),
        (200, 3),
    ]
    assert all(r.kling_path == f"/v1/videos/video-extend/{task.task_id}" for r in lines)
