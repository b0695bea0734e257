"""Every answer is bounded: pagination always ends, and a huge body is refused unread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from kling_async import KlingClient, ResponseFormatError, ValidationError
from kling_async._cli import cli
from kling_async._transport import MAX_ANSWER_BYTES

Route = Callable[[web.Request], Any]


class Gateway:
    """A misbehaving server in a thread of its own (the CLI runs its own event loop)."""

    def __init__(self, **routes: Route) -> None:
        self.routes = routes
        self.requests: list[str] = []
        self.sent = 0  # body bytes a streaming handler managed to write
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        kind = "list" if request.path == "/v1/videos/video-extend" else "get"
        result: web.StreamResponse = await self.routes[kind](request)
        return result

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> Gateway:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def task(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id, "task_status": "submitted", "task_status_msg": ""}


def page_of(tasks: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"code": 0, "message": "", "request_id": "r", "data": tasks})


def size(request: web.Request) -> int:
    return int(request.query["pageSize"])


async def ignores_page_num(request: web.Request) -> web.Response:
    return page_of([task(f"t{i}") for i in range(size(request))])


async def one_too_many(request: web.Request) -> web.Response:
    return page_of([task(f"t{i}") for i in range(size(request) + 1)])


async def endless(request: web.Request) -> web.Response:
    number = int(request.query["pageNum"])
    return page_of([task(f"p{number}-{i}") for i in range(size(request))])


@pytest.fixture
def client_for() -> Iterator[Callable[..., Gateway]]:
    gateways: list[Gateway] = []

    def start(**routes: Route) -> Gateway:
        gateway = Gateway(**routes).__enter__()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.__exit__()


async def test_a_server_ignoring_page_num_ends_after_the_repeat(
    client_for: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    gateway = client_for(list=ignores_page_num)
    async with KlingClient(api_key="k" * 10, base_url=gateway.url) as kling:
        tasks = [t async for t in kling.iter_tasks(page_size=3)]
    assert [t.task_id for t in tasks] == ["t0", "t1", "t2"]
    assert len(gateway.requests) == 2
    assert "ignores pageNum" in caplog.text


async def test_a_page_longer_than_asked_is_an_error_naming_it(
    client_for: Callable[..., Gateway],
) -> None:
    gateway = client_for(list=one_too_many)
    async with KlingClient(api_key="k" * 10, base_url=gateway.url) as kling:
        with pytest.raises(ResponseFormatError, match="page 1 holds 4 tasks, more than the 3"):
            await kling.list_tasks(1, 3)
        with pytest.raises(ResponseFormatError, match="page 1 holds"):
            [t async for t in kling.iter_tasks(page_size=3)]
        with pytest.raises(ValidationError, match="1 to 1000"):
            await kling.list_tasks(1001)


async def test_endless_full_pages_stop_at_kling_s_last_page(
    client_for: Callable[..., Gateway],
) -> None:
    gateway = client_for(list=endless)
    async with KlingClient(api_key="k" * 10, base_url=gateway.url) as kling:
        count = sum([1 async for _ in kling.iter_tasks(page_size=1)])
    assert count == 1000
    assert gateway.requests[-1].endswith("pageNum=1000&pageSize=1")


def test_list_all_on_the_command_line_ends(
    client_for: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = client_for(list=ignores_page_num)
    monkeypatch.setenv("KLING_API_KEY", "k" * 10)
    monkeypatch.setenv("KLING_BASE_URL", gateway.url)
    for key in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(cli, ["list", "--all", "--json", "--page-size", "5"])
    assert result.exit_code == 0, result.output
    assert len([json.loads(line) for line in result.stdout.splitlines()]) == 5


@pytest.mark.parametrize("announced", [True, False])
async def test_a_huge_answer_is_refused_without_reading_it_all(
    client_for: Callable[..., Gateway], announced: bool
) -> None:
    total = 150 * 2**20
    gateway: Gateway

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if announced:
            response.content_length = total
        await response.prepare(request)
        chunk = b" " * 2**20
        try:
            for _ in range(total // len(chunk)):
                await response.write(chunk)
                gateway.sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    gateway = client_for(get=huge)
    async with KlingClient(api_key="k" * 10, base_url=gateway.url, max_retries=0) as kling:
        with pytest.raises(ResponseFormatError, match="larger than 4 MiB"):
            await kling.get_task("t1")
    await asyncio.sleep(0)
    assert MAX_ANSWER_BYTES == 4 * 2**20
    assert gateway.sent < total / 4  # the connection was closed, not drained
