"""A server that echoes the client's credentials back cannot make them reach the user.

The "gateway" here answers like a careless reseller: every error message and every task
repeats the Authorization header it was sent. The client's key, its secret and every JWT
it signed must be scrubbed from errors, log lines, tasks, the journal and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from kling_async import ExtendRequest, InvalidRequestError, KlingClient
from kling_async._cli import cli

API_KEY = "sk-echoed-api-key-0123456789"
ACCESS_KEY = "ak-echoed-access-key-0123"
SECRET_KEY = "sec-echoed-secret-key-4567"


class EchoGateway:
    """A gateway in a thread of its own (the CLI runs its own event loop)."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # every Authorization header received
        self.polls = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def _answer(
        self, request: web.Request, status: int, code: int, data: Any = None
    ) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth.removeprefix("Bearer "))
        message = f"invalid Authorization: {auth} (known: {API_KEY} {ACCESS_KEY} {SECRET_KEY})"
        body = {"code": code, "message": message, "request_id": "r-1", "data": data}
        return web.json_response(body, status=status)

    async def _create(self, request: web.Request) -> web.Response:
        return self._answer(request, 400, 1201)

    async def _get(self, request: web.Request) -> web.Response:
        self.polls += 1
        if self.polls == 1:
            return self._answer(request, 500, 5000)
        auth = request.headers.get("Authorization", "")
        task = {
            "task_id": request.match_info["id"],
            "task_status": "succeed",
            "task_status_msg": f"done for {auth}",
            "task_result": {"videos": []},
        }
        return self._answer(request, 200, 0, task)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/videos/video-extend", self._create)
        app.router.add_get("/v1/videos/video-extend/{id}", self._get)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> EchoGateway:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def secrets(self) -> list[str]:
        """The client's credentials (it is given the key or the key pair) and its tokens."""
        given = [API_KEY] if API_KEY in self.seen else [ACCESS_KEY, SECRET_KEY]
        return [*given, *self.seen]


@pytest.fixture
def gateway() -> Iterator[EchoGateway]:
    with EchoGateway() as gateway:
        yield gateway


def assert_clean(text: str, gateway: EchoGateway) -> None:
    assert gateway.seen, "the gateway saw no request"
    for secret in gateway.secrets():
        if secret:
            assert secret not in text


def every_byte_in(folder: Path) -> bytes:
    """The journal and whatever SQLite left beside it (-wal, -journal)."""
    return b"".join(p.read_bytes() for p in folder.iterdir())


@pytest.mark.parametrize("mode", ["api_key", "jwt"])
async def test_errors_tasks_and_log_lines_never_carry_an_echoed_credential(
    gateway: EchoGateway, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    credentials: dict[str, Any] = (
        {"api_key": API_KEY}
        if mode == "api_key"
        else {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
    )
    caplog.set_level(logging.DEBUG, logger="kling_async")
    async with KlingClient(base_url=gateway.url, max_retries=1, **credentials) as kling:
        with pytest.raises(InvalidRequestError) as caught:
            await kling.extend_video("828006748715380777", "go on")
        error = caught.value
        assert "***" in error.message
        done = await kling.wait_for_task("t-1", timeout=30)  # a 500 first: a WARNING line
    assert "***" in done.status_message
    assert_clean(f"{error} {error!r} {error.message} {error.args}", gateway)
    assert_clean(repr(done) + done.status_message, gateway)
    assert_clean(caplog.text, gateway)
    assert any(record.levelno >= logging.INFO for record in caplog.records)


async def test_the_journal_never_stores_an_echoed_credential(
    gateway: EchoGateway, tmp_path: Path
) -> None:
    journal = tmp_path / "batch.journal"
    request = ExtendRequest("828006748715380777", "go on")
    async with KlingClient(
        access_key=ACCESS_KEY, secret_key=SECRET_KEY, base_url=gateway.url, max_retries=0
    ) as kling:
        results = [r async for r in kling.extend_many([request], journal=journal)]
    assert isinstance(results[0].error, InvalidRequestError)
    stored = every_byte_in(tmp_path)
    assert b"***" in stored
    assert_clean(stored.decode("utf-8", "replace"), gateway)


def test_the_command_line_never_prints_a_signed_token(
    gateway: EchoGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLING_API_KEY", raising=False)
    monkeypatch.setenv("KLING_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("KLING_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("KLING_BASE_URL", gateway.url)
    runner = CliRunner()
    created = runner.invoke(cli, ["extend", "828006748715380777", "go on", "--json"])
    status = runner.invoke(cli, ["status", "t-1", "--json"])
    status = runner.invoke(cli, ["status", "t-1", "--json"])  # the first met the 500
    assert created.exit_code != 0
    assert json.loads(status.stdout)["task_status_msg"].startswith("done for Bearer ***")
    assert_clean(created.output + status.output + str(created.exception), gateway)
