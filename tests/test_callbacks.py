"""The callback receiver over real sockets: signatures, duplicates, formats, delivery, waits."""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

import kling_async
from kling_async import (
    ConfigurationError,
    ExtendRequest,
    KlingClient,
    KlingError,
    PollPolicy,
    ResponseFormatError,
    Task,
)
from kling_async import TaskStatus as Status
from kling_async.callbacks import (
    CallbackReceiver,
    CallbackVerifier,
    InvalidSignatureError,
    parse_callback,
)
from kling_async.testing import Simulator

SAMPLES = Path(__file__).parent / "samples"
LEGACY = (SAMPLES / "callback-legacy.json").read_bytes()
NEW = (SAMPLES / "callback-new.json").read_bytes()
SECRET = "whsec_" + base64.b64encode(b"kling-async test webhook key!!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"an old key that was rotated out").decode()
WAIT = 5.0  # generous: only reached when something is broken


def signed(
    body: bytes,
    *,
    msg_id: str = "msg_1",
    when: datetime | None = None,
    secret: str = SECRET,
) -> dict[str, str]:
    when = when or datetime.now(timezone.utc)
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=body, headers=headers or {}) as response:
        return response.status, orjson.loads(await response.read())


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(SECRET)
    async with receiver.serve():
        yield receiver


# -- signatures -------------------------------------------------------------------------


async def test_valid_signature_delivers_the_task(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    with receiver.subscribe("828006748715380777") as subscription:
        status, answer = await post(http, receiver.url, LEGACY, signed(LEGACY))
        assert (status, answer) == (200, {"ok": True})
        task = await subscription.next(WAIT)
    assert task is not None
    assert task.status is Status.SUCCEED
    assert task.videos[0].id == "828006748715380778"
    assert task.external_task_id == "batch-7f3a-0001"
    assert receiver.latest("828006748715380777") == task


BAD_HEADERS = [
    pytest.param(signed(LEGACY.replace(b"succeed", b"failed")), id="tampered-body"),
    pytest.param(
        signed(LEGACY, when=datetime.now(timezone.utc) - timedelta(minutes=10)), id="stale"
    ),
    pytest.param(
        signed(LEGACY, when=datetime.now(timezone.utc) + timedelta(minutes=10)), id="future"
    ),
    pytest.param({"Content-Type": "application/json"}, id="unsigned"),
    pytest.param(signed(LEGACY, secret=OTHER_SECRET), id="wrong-key"),
    pytest.param({**signed(LEGACY), "webhook-signature": "garbage"}, id="no-comma"),
    pytest.param({**signed(LEGACY), "webhook-signature": "v1,abc"}, id="bad-base64"),
    pytest.param({**signed(LEGACY), "webhook-timestamp": "soon"}, id="timestamp-text"),
    pytest.param({**signed(LEGACY), "webhook-timestamp": "nan"}, id="timestamp-nan"),
    pytest.param({**signed(LEGACY), "webhook-id": ""}, id="empty-id"),
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_bad_signatures_are_401_and_deliver_nothing(
    receiver: CallbackReceiver, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    with receiver.subscribe("828006748715380777") as subscription:
        status, answer = await post(http, receiver.url, LEGACY, headers)
        assert status == 401
        assert answer == {"ok": False, "error": "invalid signature"}
        assert await subscription.next(0) is None
    assert receiver.latest("828006748715380777") is None


async def test_non_utf8_body_is_401_not_500(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    status, _ = await post(http, receiver.url, b"\xff\xfe{}", signed(b"{}"))
    assert status == 401


async def test_rotated_keys_accept_any_matching_signature(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    old = signed(LEGACY, secret=OTHER_SECRET)["webhook-signature"]
    headers = signed(LEGACY)
    # A stray comma-less entry and doubled spaces do not hide the good signature.
    headers["webhook-signature"] = f"{old}  garbage {headers['webhook-signature']}"
    status, _ = await post(http, receiver.url, LEGACY, headers)
    assert status == 200
    assert receiver.latest("828006748715380777") is not None


async def test_a_401_does_not_mark_the_id_seen(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    forged = {**signed(LEGACY, msg_id="msg_x"), "webhook-signature": "v1,AAAA"}
    assert (await post(http, receiver.url, LEGACY, forged))[0] == 401
    status, answer = await post(http, receiver.url, LEGACY, signed(LEGACY, msg_id="msg_x"))
    assert (status, answer) == (200, {"ok": True})
    assert receiver.latest("828006748715380777") is not None


# -- duplicates, bodies -----------------------------------------------------------------


async def test_duplicate_id_is_200_and_delivered_once(
    http: aiohttp.ClientSession,
) -> None:
    delivered: list[Task] = []
    receiver = CallbackReceiver(SECRET, on_task=delivered.append)
    async with receiver.serve() as url:
        with receiver.subscribe("828006748715380777") as subscription:
            first = await post(http, url, LEGACY, signed(LEGACY, msg_id="msg_dup"))
            second = await post(http, url, LEGACY, signed(LEGACY, msg_id="msg_dup"))
            assert first == (200, {"ok": True})
            assert second == (200, {"ok": True, "duplicate": True})
            assert await subscription.next(WAIT) is not None
            assert await subscription.next(0) is None
    assert len(delivered) == 1


async def test_remembered_ids_are_bounded(http: aiohttp.ClientSession) -> None:
    receiver = CallbackReceiver(SECRET, remember_ids=2)
    async with receiver.serve() as url:
        for msg_id in ("a", "b", "c", "a"):
            status, answer = await post(http, url, LEGACY, signed(LEGACY, msg_id=msg_id))
            assert (status, answer) == (200, {"ok": True})  # "a" was forgotten


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'"a string"', "body"),
        (b'{"hello": "world"}', "body"),
        (b'{"task_id": 5, "task_status": "succeed"}', "body.task_id"),
        (b'{"id": "1", "status": "succeeded", "outputs": {}}', "body.outputs"),
        (b'{"id": "1", "status": "succeeded", "outputs": [{"type": "video"}]}', "body"),
    ],
)
async def test_malformed_body_is_400(
    receiver: CallbackReceiver, http: aiohttp.ClientSession, body: bytes, where: str
) -> None:
    status, answer = await post(http, receiver.url, body, signed(body))
    assert status == 400
    assert answer["ok"] is False
    assert where in answer["error"]


async def test_oversized_body_is_413(http: aiohttp.ClientSession) -> None:
    receiver = CallbackReceiver(SECRET, max_body_size=len(LEGACY) - 1)
    async with receiver.serve() as url:
        status, _ = await post(http, url, LEGACY, signed(LEGACY))
        assert status == 413

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check first
            yield LEGACY[:100]
            yield LEGACY[100:]

        status, _ = await post(http, url, chunked(), signed(LEGACY))
        assert status == 413
        assert receiver.latest("828006748715380777") is None


# -- modes and formats ------------------------------------------------------------------


async def test_without_a_secret_nothing_is_verified(http: aiohttp.ClientSession) -> None:
    receiver = CallbackReceiver()
    assert not receiver.verifies_signatures
    sub = receiver.subscribe("828006748715380777")
    async with receiver.serve() as url:
        # No webhook-id: nothing to de-duplicate by, so both are delivered.
        assert (await post(http, url, LEGACY))[0] == 200
        assert (await post(http, url, LEGACY))[0] == 200
        assert await sub.next(WAIT) is not None
        assert await sub.next(WAIT) is not None
        # A webhook-id, even unsigned, is still de-duplicated.
        headers = {"webhook-id": "msg_plain"}
        assert (await post(http, url, LEGACY, headers)) == (200, {"ok": True})
        assert (await post(http, url, LEGACY, headers))[1] == {"ok": True, "duplicate": True}
    sub.close()


async def test_new_format_is_normalised(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    assert (await post(http, receiver.url, NEW, signed(NEW)))[0] == 200
    task = receiver.latest("913827032734642185")
    assert task is not None
    assert task.status is Status.SUCCEED
    assert task.raw_status == "succeed"
    assert task.external_task_id == "batch-7f3a-0002"
    assert [(v.id, v.url, v.duration) for v in task.videos] == [
        ("913827032734642186", "https://cdn.example.com/c.mp4", 10.0)
    ]
    assert task.created_at == datetime.fromtimestamp(1785901861.504, tz=timezone.utc)
    assert task.updated_at == datetime.fromtimestamp(1785901931.504, tz=timezone.utc)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("submitted", Status.SUBMITTED),
        ("processing", Status.PROCESSING),
        ("failed", Status.FAILED),
        ("queueing", Status.UNKNOWN),
    ],
)
async def test_new_format_statuses(
    receiver: CallbackReceiver, http: aiohttp.ClientSession, raw: str, status: Status
) -> None:
    body = orjson.dumps({"id": "t1", "status": raw, "message": "why", "outputs": []})
    assert (await post(http, receiver.url, body, signed(body)))[0] == 200
    task = receiver.latest("t1")
    assert task is not None
    assert (task.status, task.raw_status, task.status_message) == (status, raw, "why")


async def test_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", SECRET)
    receiver = CallbackReceiver()
    assert receiver.verifies_signatures
    async with receiver.serve() as url:
        assert (await post(http, url, LEGACY))[0] == 401
        assert (await post(http, url, LEGACY, signed(LEGACY)))[0] == 200


def test_empty_environment_secret_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", "")
    assert not CallbackReceiver().verifies_signatures


# 29 base64 characters cannot be decoded; an empty key is refused too.
BAD_SECRET = "whsec_QWxhZGRpbjpvcGVuc2VzYW1lX"


@pytest.mark.parametrize("bad", [BAD_SECRET, "whsec_", "   "])
def test_bad_secret_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    with pytest.raises(ConfigurationError, match="secret") as caught:
        CallbackReceiver(bad)
    assert BAD_SECRET.removeprefix("whsec_") not in str(caught.value)
    # The library's own exception (which could show the input) is not chained.
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_bad_environment_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", BAD_SECRET)
    with pytest.raises(ConfigurationError, match="KLING_WEBHOOK_SECRET") as caught:
        CallbackReceiver()
    assert BAD_SECRET.removeprefix("whsec_") not in str(caught.value)


def test_repr_shows_no_secret() -> None:
    receiver = CallbackReceiver(SECRET, url="https://example.com/hook")
    text = repr(receiver)
    assert SECRET not in text
    assert SECRET.removeprefix("whsec_") not in text
    assert "verifying signatures" in text


@pytest.mark.parametrize(
    "options",
    [
        {"url": "ftp://example.com/x"},
        {"url": "/relative"},
        {"path": "no-slash"},
        {"max_body_size": 0},
        {"remember_ids": True},
        {"on_task": "not callable"},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CallbackReceiver(**options)


async def test_url_comes_from_the_argument_or_the_served_address() -> None:
    receiver = CallbackReceiver()
    with pytest.raises(ConfigurationError, match="url="):
        _ = receiver.url
    async with receiver.serve() as served:
        assert receiver.url == served
        assert served.startswith("http://127.0.0.1:")
        assert served.endswith("/kling/callback")
        with pytest.raises(RuntimeError, match="already"):
            async with receiver.serve():
                pass  # pragma: no cover
    with pytest.raises(ConfigurationError):
        _ = receiver.url
    given = CallbackReceiver(url="https://example.com/hook")
    async with given.serve() as served:
        assert given.url == "https://example.com/hook" != served


@contextlib.asynccontextmanager
async def users_app(app: web.Application) -> AsyncIterator[str]:
    """A user's own aiohttp app, served on 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def mount(receiver: CallbackReceiver, how: str) -> web.Application:
    app = web.Application()
    if how == "add_post(path, receiver)":  # the contract's own line
        app.router.add_post("/hooks/kling", receiver)
    elif how == "add_post(path, receiver.handle)":
        app.router.add_post("/hooks/kling", receiver.handle)
    else:
        receiver.add_to(app)
    return app


@pytest.mark.parametrize(
    "how", ["add_post(path, receiver)", "add_post(path, receiver.handle)", "add_to(app)"]
)
@pytest.mark.parametrize("signing", ["signed", "unsigned"])
async def test_mounted_in_a_users_app(http: aiohttp.ClientSession, how: str, signing: str) -> None:
    receiver = CallbackReceiver(SECRET if signing == "signed" else None, path="/hooks/kling")
    headers = signed(NEW) if signing == "signed" else {"Content-Type": "application/json"}
    async with users_app(mount(receiver, how)) as base:
        url = f"{base}/hooks/kling"
        with receiver.subscribe("913827032734642185") as subscription:
            assert await post(http, url, NEW, headers) == (200, {"ok": True})
            task = await subscription.next(WAIT)
        assert task is not None
        assert task.succeeded
        if signing == "signed":  # the check runs however the receiver is mounted
            forged = {**headers, "webhook-signature": "v1,AAAA"}
            assert (await post(http, url, NEW, forged))[0] == 401
        assert (await post(http, url, b"{not json"))[0] == (401 if signing == "signed" else 400)


# -- delivery ---------------------------------------------------------------------------


async def test_on_task_sync_and_async(http: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def hook(task: Task) -> None:
        seen.append(task.task_id)

    receiver = CallbackReceiver(on_task=hook)
    async with receiver.serve() as url:
        await post(http, url, LEGACY)
        await post(http, url, NEW)
    assert seen == ["828006748715380777", "913827032734642185"]


async def test_on_task_failure_is_500_and_the_retry_gets_through(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Task] = []

    def hook(task: Task) -> None:
        calls.append(task)
        if len(calls) == 1:
            raise RuntimeError("user bug")

    receiver = CallbackReceiver(SECRET, on_task=hook)
    async with receiver.serve() as url:
        with caplog.at_level(logging.ERROR, logger="kling_async"):
            assert (await post(http, url, LEGACY, signed(LEGACY)))[0] == 500
        assert (await post(http, url, LEGACY, signed(LEGACY))) == (200, {"ok": True})
    assert len(calls) == 2
    assert "on_task failed" in caplog.text
    assert SECRET not in caplog.text


async def test_a_callback_before_subscribing_is_not_lost(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    await post(http, receiver.url, LEGACY, signed(LEGACY))
    with receiver.subscribe("828006748715380777") as subscription:
        task = await subscription.next(0)
    assert task is not None
    assert task.succeeded
    assert subscription.closed
    assert await subscription.next(WAIT) is None  # closed: answers at once


async def test_every_subscriber_gets_every_update(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    first, second = receiver.subscribe("t1"), receiver.subscribe("t1")
    other = receiver.subscribe("t2")
    for n, raw in enumerate(("submitted", "processing")):
        body = orjson.dumps({"task_id": "t1", "task_status": raw, "updated_at": n})
        await post(http, receiver.url, body, signed(body, msg_id=f"m{n}"))
    first.close()
    for subscription in (first, second):
        assert "t1" in repr(subscription)
    got = [await second.next(WAIT), await second.next(WAIT)]
    assert [task.raw_status for task in got if task is not None] == ["submitted", "processing"]
    assert await other.next(0) is None
    second.close()
    other.close()
    second.close()  # twice is fine


async def test_latest_never_goes_back_from_a_finished_state(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    for n, raw in enumerate(("succeed", "processing")):
        body = orjson.dumps({"task_id": "t1", "task_status": raw})
        await post(http, receiver.url, body, signed(body, msg_id=f"m{n}"))
    late = orjson.dumps({"task_id": "t2", "task_status": "processing", "updated_at": 5})
    early = orjson.dumps({"task_id": "t2", "task_status": "submitted", "updated_at": 1})
    for n, body in enumerate((late, early)):
        await post(http, receiver.url, body, signed(body, msg_id=f"o{n}"))
    assert (latest := receiver.latest("t1")) is not None
    assert latest.raw_status == "succeed"
    assert (latest := receiver.latest("t2")) is not None
    assert latest.raw_status == "processing"


async def test_a_slow_subscriber_keeps_only_the_newest_updates(
    receiver: CallbackReceiver, http: aiohttp.ClientSession
) -> None:
    from kling_async.callbacks import SUBSCRIPTION_QUEUE_SIZE

    with receiver.subscribe("t1") as subscription:
        for n in range(SUBSCRIPTION_QUEUE_SIZE + 3):
            body = orjson.dumps({"task_id": "t1", "task_status": "processing", "updated_at": n})
            await post(http, receiver.url, body, signed(body, msg_id=f"m{n}"))
        first = await subscription.next(0)
        assert first is not None
        assert first.updated_at == datetime.fromtimestamp(0.003, tz=timezone.utc)


# -- the pure function, without aiohttp -------------------------------------------------


def title_case(headers: dict[str, str]) -> dict[str, str]:
    """Headers as a plain dict spelled the way some frameworks hand them over."""
    return {name.title(): value for name, value in headers.items()}


def test_parse_callback_reads_a_signed_callback_without_a_server() -> None:
    task = parse_callback(LEGACY, title_case(signed(LEGACY)), secret=SECRET)
    assert (task.task_id, task.status) == ("828006748715380777", Status.SUCCEED)
    assert task.videos[0].id == "828006748715380778"
    # The same task the handler delivers: one parser behind both.
    assert parse_callback(NEW, signed(NEW), secret=SECRET).task_id == "913827032734642185"


@pytest.mark.parametrize("headers", BAD_HEADERS)
def test_parse_callback_bad_signatures(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        parse_callback(LEGACY, headers, secret=SECRET)
    assert isinstance(caught.value, KlingError)
    assert not isinstance(caught.value, ResponseFormatError)  # 401, not 400
    assert SECRET.removeprefix("whsec_") not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"hello": "world"}', "body"),
        (b'{"task_id": 5, "task_status": "succeed"}', "body.task_id"),
    ],
)
@pytest.mark.parametrize("secret", [SECRET, None])
def test_parse_callback_malformed_bodies(body: bytes, where: str, secret: str | None) -> None:
    with pytest.raises(ResponseFormatError) as caught:
        parse_callback(body, signed(body), secret=secret)
    assert not isinstance(caught.value, InvalidSignatureError)
    assert where in str(caught.value)


def test_parse_callback_checks_the_signature_before_reading_the_body() -> None:
    # An unsigned, malformed body says nothing about its shape to an unauthenticated sender.
    with pytest.raises(InvalidSignatureError):
        parse_callback(b"{not json", {}, secret=SECRET)


def test_parse_callback_without_a_secret_verifies_nothing() -> None:
    assert parse_callback(LEGACY, {}, secret=None).succeeded
    with pytest.raises(TypeError):
        parse_callback(LEGACY, {})  # type: ignore[call-arg]  # the choice must be explicit


def test_a_verifier_is_kept_for_one_secret() -> None:
    verifier = CallbackVerifier(SECRET)
    assert verifier.verifies_signatures
    assert SECRET.removeprefix("whsec_") not in repr(verifier)
    for n in range(3):
        headers = signed(LEGACY, msg_id=f"m{n}")
        verifier.verify(LEGACY, headers)
        assert verifier.parse(LEGACY, headers).succeeded
    with pytest.raises(InvalidSignatureError):
        verifier.verify(LEGACY, signed(LEGACY, secret=OTHER_SECRET))
    assert not CallbackVerifier(None).verifies_signatures
    CallbackVerifier(None).verify(b"anything", {})  # nothing to check


@pytest.mark.parametrize("bad", [BAD_SECRET, "whsec_", "   "])
def test_a_verifier_refuses_a_bad_secret(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="secret") as caught:
        CallbackVerifier(bad)
    assert BAD_SECRET.removeprefix("whsec_") not in str(caught.value)


def test_the_pure_part_imports_no_aiohttp() -> None:
    """kling_async._webhooks and what it imports of ours never import aiohttp."""
    package = Path(kling_async.__file__).parent
    todo, seen = ["_webhooks"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert not module.startswith("aiohttp"), f"{name} imports {module}"
                if module.startswith("kling_async."):
                    todo.append(module.removeprefix("kling_async."))
    assert {"_webhooks", "_converter", "_models", "errors"} <= seen


# -- with the client and the simulator --------------------------------------------------


async def test_wait_for_task_returns_on_the_callback() -> None:
    receiver = CallbackReceiver(SECRET)
    async with (
        Simulator(processing_time=600, webhook_secret=SECRET) as sim,
        receiver.serve() as url,
        KlingClient(api_key="sim-api-key", base_url=sim.base_url) as kling,
        aiohttp.ClientSession() as http,
    ):
        task = await kling.extend_video("743211632612511839", "go on", callback_url=url)
        waiting = asyncio.ensure_future(kling.wait_for_task(task, callbacks=receiver))
        body = sim.tasks[task.task_id].to_json()
        body["task_status"] = "succeed"
        body["task_result"] = {
            "videos": [{"id": "v1", "url": "https://cdn/x.mp4", "duration": "9"}]
        }
        raw = orjson.dumps(body)
        status, _ = await post(http, url, raw, signed(raw, msg_id="mine"))
        assert status == 200
        done = await asyncio.wait_for(waiting, WAIT)
        assert done.succeeded
        assert done.videos[0].id == "v1"
        # The service itself still says processing: the callback ended the wait.
        assert not (await kling.get_task(task.task_id)).is_terminal


async def test_extend_and_wait_polls_when_callbacks_are_lost() -> None:
    receiver = CallbackReceiver(SECRET)
    async with (
        Simulator(submit_time=0.05, processing_time=0.1, webhook_secret=SECRET) as sim,
        receiver.serve() as url,
        KlingClient(
            api_key="sim-api-key",
            base_url=sim.base_url,
            poll=PollPolicy(initial=0.05, factor=1.5, max_interval=0.2),
        ) as kling,
    ):
        sim.drop_callbacks = True
        request = ExtendRequest("743211632612511839", "go on")
        done = await kling.extend_and_wait(request, callbacks=receiver, timeout=WAIT)
        assert done.succeeded
        assert sim.tasks[done.task_id].callback_url == url
        assert sim.counters.callbacks_dropped >= 1
        assert receiver.latest(done.task_id) is None


async def test_simulator_callbacks_are_received() -> None:
    receiver = CallbackReceiver(SECRET)
    async with (
        Simulator(submit_time=0.05, processing_time=0.1, webhook_secret=SECRET) as sim,
        receiver.serve(),
        KlingClient(api_key="sim-api-key", base_url=sim.base_url) as kling,
    ):
        request = ExtendRequest("743211632612511839", "go on")
        # The default poll waits 2 s first: finishing sooner means a callback did it.
        done = await kling.extend_and_wait(request, callbacks=receiver, timeout=1.5)
        assert done.succeeded
        assert receiver.latest(done.task_id) == done
        assert sim.counters.callbacks_sent >= 1
