"""The guides' programs run against the simulator, and the generated reference matches the code.

- examples/web_aiohttp.py on aiohttp's test server (127.0.0.1), callbacks included;
- examples/web_fastapi.py through httpx's ASGI transport, its lifespan run as uvicorn would;
- examples/bot_aiogram.py: its logic with the simulator, its aiogram wiring fed updates
  through a real `Dispatcher` (no network: the replies go to a list);
- docs/hooks.py: the errors table from the protocol's codes, the polling numbers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from kling_async import KlingClient, PollPolicy
from kling_async.testing import Simulator

ROOT = Path(__file__).resolve().parent.parent
FAST_POLL = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)


def load(relative: str) -> ModuleType:
    """Import a file of the repository (examples/ and docs/ are not packages)."""
    path = ROOT / relative
    name = f"_guide_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and dataclass-like machinery look it up
    spec.loader.exec_module(module)
    return module


class Example:
    """An example program, imported on first use: FastAPI and aiogram take seconds to
    import, and every test worker collects this module, most without running it."""

    def __init__(self, relative: str) -> None:
        self._relative = relative
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pytest probes every module attribute for fixtures
            raise AttributeError(name)
        if self._module is None:
            self._module = load(self._relative)
        return getattr(self._module, name)


web_aiohttp = Example("examples/web_aiohttp.py")
web_fastapi = Example("examples/web_fastapi.py")
bot_aiogram = Example("examples/bot_aiogram.py")


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    """The docs build's hook module (it imports the protocol's table of codes)."""
    return load("docs/hooks.py")


@pytest.fixture
async def sim(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Simulator]:
    """A simulator the examples reach through the environment, as a user's would."""
    async with Simulator(submit_time=0.05, processing_time=0.2, seed=3) as simulator:
        monkeypatch.setenv("KLING_BASE_URL", simulator.base_url)
        assert simulator.api_key is not None
        monkeypatch.setenv("KLING_API_KEY", simulator.api_key)
        yield simulator


async def until(check: Callable[[], Any], what: str, *, tries: int = 3000) -> Any:
    """Ask `check` (sync or async) every 10 ms until it answers something true (for at
    least 30 s: a bound only a hang reaches, however busy the machine)."""
    for _ in range(tries):
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


# -- the aiohttp service -----------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_aiohttp_service_starts_an_extension_and_reports_it_from_the_callback(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    async with TestServer(web_aiohttp.create_app(), host="127.0.0.1") as server:
        answer = await http.post(
            server.make_url("/extensions"),
            json={"video_id": "828006748715380777", "prompt": "and then it rains"},
        )
        started = await answer.json()
        assert answer.status == 202
        assert started["status"] == "submitted"
        assert answer.headers["Location"] == started["status_url"]
        assert started["status_url"] == f"/extensions/{started['task_id']}"
        assert answer.headers["Retry-After"] == "5"

        async def finished() -> dict[str, Any] | None:
            reply = await http.get(server.make_url(started["status_url"]))
            assert reply.status == 200
            document: dict[str, Any] = await reply.json()
            if document["status"] == "succeed":
                assert "Retry-After" not in reply.headers
                return document
            assert reply.headers["Retry-After"] == "5"
            return None

        done = await until(finished, "the task to succeed")
        assert done["videos"][0]["url"].startswith(sim.files_base_url)

        # Kling called the service back on its own route...
        def final_callback_answered() -> bool:
            return any(
                b'"succeed"' in delivery.body and delivery.status == 200
                for delivery in sim.recent_callbacks
            )

        # The callback that says "succeed", answered by the service (not merely the
        # second of three: on a busy machine the last one may still be on its way).
        await until(final_callback_answered, "the final callback")
        callback_url = sim.tasks[started["task_id"]].callback_url
        assert callback_url == str(server.make_url("/kling/callback"))
        # ...so a finished task is reported from the callback, without asking Kling.
        gets = sim.counters.gets
        again = await (await http.get(server.make_url(started["status_url"]))).json()
        assert again == done
        assert sim.counters.gets == gets


async def test_aiohttp_service_answers_bad_input_and_unknown_tasks(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    async with TestServer(web_aiohttp.create_app(), host="127.0.0.1") as server:
        blank = await http.post(server.make_url("/extensions"), json={"prompt": "rain"})
        assert blank.status == 422
        assert "video_id" in (await blank.json())["error"]
        not_json = await http.post(server.make_url("/extensions"), data=b"{")
        assert not_json.status == 400
        unknown = await http.get(server.make_url("/extensions/123456"))
        assert unknown.status == 404
        sim.inject("503", on="create", times=5)  # more than the service's 2 retries
        down = await http.post(
            server.make_url("/extensions"), json={"video_id": "1", "prompt": "rain"}
        )
        assert down.status == 503
        assert down.headers["Retry-After"] == "60"
    assert sim.counters.tasks_created == 0


async def test_aiohttp_service_restarted_with_a_task_in_flight_still_reports_it(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.processing_time = 30.0  # still running when the service stops
    async with TestServer(web_aiohttp.create_app(), host="127.0.0.1") as server:
        answer = await http.post(
            server.make_url("/extensions"), json={"video_id": "1", "prompt": "rain"}
        )
        started = await answer.json()
    # The service is gone (its client closed); the task goes on at Kling and finishes.
    sim.finish_task(started["task_id"])
    async with TestServer(web_aiohttp.create_app(), host="127.0.0.1") as server:
        reply = await http.get(server.make_url(started["status_url"]))
        assert (await reply.json())["status"] == "succeed"
    assert sim.counters.tasks_created == 1


# -- the FastAPI service -----------------------------------------------------------------


@pytest.fixture
async def fastapi_client() -> AsyncIterator[Any]:
    import httpx

    app = web_fastapi.create_app(poll=FAST_POLL)
    # httpx's ASGI transport does not run the lifespan: run it as uvicorn would.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as c,
    ):
        c.app = app
        yield c


async def test_fastapi_service_starts_an_extension_and_reports_it(
    sim: Simulator, fastapi_client: Any
) -> None:
    answer = await fastapi_client.post(
        "/extensions", json={"video_id": "828006748715380777", "prompt": "and then it rains"}
    )
    assert answer.status_code == 202
    started = answer.json()
    assert started["status"] == "submitted"
    assert answer.headers["location"] == started["status_url"]
    assert started["status_url"] == f"/extensions/{started['task_id']}"

    running = await fastapi_client.get(started["status_url"])
    assert running.json()["status"] in {"submitted", "processing"}
    assert running.headers["retry-after"] == "5"

    # The background watcher polls the task to its end; the status is then served from it.
    watchers = fastapi_client.app.state.watchers
    await until(lambda: started["task_id"] in watchers.finished, "the watcher")
    gets = sim.counters.gets
    done = await fastapi_client.get(started["status_url"])
    assert done.json()["status"] == "succeed"
    assert done.json()["videos"][0]["url"].startswith(sim.files_base_url)
    assert "retry-after" not in done.headers
    assert sim.counters.gets == gets


async def test_fastapi_service_answers_bad_input_and_unknown_tasks(
    sim: Simulator, fastapi_client: Any
) -> None:
    spaced = await fastapi_client.post("/extensions", json={"video_id": "1 2", "prompt": "x"})
    assert spaced.status_code == 422
    assert "video_id" in spaced.json()["error"]
    missing = await fastapi_client.post("/extensions", json={"video_id": "1"})
    assert missing.status_code == 422  # FastAPI's own validation
    unknown = await fastapi_client.get("/extensions/123456")
    assert unknown.status_code == 404
    assert sim.counters.tasks_created == 0


async def test_fastapi_service_shut_down_with_a_task_in_flight(sim: Simulator) -> None:
    import httpx

    sim.processing_time = 30.0
    app = web_fastapi.create_app(poll=FAST_POLL)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            started = (
                await client.post("/extensions", json={"video_id": "1", "prompt": "rain"})
            ).json()
        watchers = app.state.watchers
        assert len(watchers._running) == 1
    # Shutdown cancelled the watcher and closed the client (no warning, no leak)...
    assert not watchers._running
    assert repr(app.state.kling).endswith(" closed>")
    # ...and the task, finished at Kling meanwhile, is found by the next process.
    sim.finish_task(started["task_id"])
    app = web_fastapi.create_app(poll=FAST_POLL)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as c,
    ):
        assert (await c.get(started["status_url"])).json()["status"] == "succeed"
    assert sim.counters.tasks_created == 1


# -- the Telegram bot --------------------------------------------------------------------


class Chat:
    """Stands in for Telegram: collects what the bot says, per chat."""

    def __init__(self) -> None:
        self.said: list[tuple[int, str]] = []

    async def reply(self, chat_id: int, text: str) -> None:
        self.said.append((chat_id, text))

    def texts(self, chat_id: int) -> list[str]:
        return [text for chat, text in self.said if chat == chat_id]


@pytest.fixture
async def kling(sim: Simulator) -> AsyncIterator[KlingClient]:
    async with KlingClient(poll=FAST_POLL, timeout=5.0) as client:
        yield client


async def test_bot_extends_a_video_with_progress_and_the_result(
    sim: Simulator, kling: KlingClient
) -> None:
    chat = Chat()
    bot = bot_aiogram.ExtendBot(kling, chat.reply)
    job = bot_aiogram.Job(chat_id=-100, message_id=7, user_id=42)
    await bot.extend(job, "828006748715380777 and then it rains")
    assert bot.running(42) == 1
    await until(lambda: any(t.startswith("Done:") for t in chat.texts(-100)), "the result")
    said = chat.texts(-100)
    assert said[0].startswith("Started task ")
    assert any("processing" in text for text in said[1:-1])
    (task,) = sim.tasks.values()
    assert task.external_task_id == "tg--100-7-42"
    assert said[-1] == f"Done: {task.result_video.url} ({task.result_video.duration:g} s)"
    assert bot.running(42) == 0
    await bot.aclose()


async def test_bot_answers_usage_and_limits_each_user(sim: Simulator, kling: KlingClient) -> None:
    sim.processing_time = 30.0
    chat = Chat()
    bot = bot_aiogram.ExtendBot(kling, chat.reply, max_running=2)
    await bot.extend(bot_aiogram.Job(1, 1, 5), None)
    await bot.extend(bot_aiogram.Job(1, 2, 5), "only-a-video-id")
    assert chat.texts(1) == [bot_aiogram.USAGE, bot_aiogram.USAGE]
    for message_id in (3, 4, 5):
        await bot.extend(bot_aiogram.Job(1, message_id, 5), "123 rain")
    await bot.extend(bot_aiogram.Job(1, 6, 9), "123 rain")  # another user is not limited
    # The limit message, wherever a status message of a running task falls beside it.
    assert "You have 2 extensions running; wait for one to finish." in chat.texts(1)
    assert bot.running(5) == 2
    assert bot.running(9) == 1
    assert sim.counters.tasks_created == 3
    await bot.aclose()


async def test_bot_reports_a_failed_task_and_an_unusable_request(
    sim: Simulator, kling: KlingClient
) -> None:
    chat = Chat()
    bot = bot_aiogram.ExtendBot(kling, chat.reply)
    await bot.extend(bot_aiogram.Job(1, 1, 5), "bad\tid rain")
    assert chat.texts(1)[-1].startswith("Cannot extend that:")
    assert bot.running(5) == 0
    sim.failure_rate = 1.0
    await bot.extend(bot_aiogram.Job(1, 2, 5), "123 rain")
    await until(lambda: "failed" in chat.texts(1)[-1], "the failure")
    assert bot.running(5) == 0
    await bot.aclose()


async def test_bot_restarted_finds_its_tasks_again(sim: Simulator, kling: KlingClient) -> None:
    sim.processing_time = 30.0
    chat = Chat()
    first = bot_aiogram.ExtendBot(kling, chat.reply)
    await first.extend(bot_aiogram.Job(10, 1, 5), "123 rain")
    await first.extend(bot_aiogram.Job(11, 2, 6), "456 snow")
    await first.aclose()  # the bot stops (or dies) with both tasks running
    task_ids = list(sim.tasks)

    second = bot_aiogram.ExtendBot(kling, chat.reply)
    assert await second.resume() == 2
    assert second.running(5) == 1
    assert second.running(6) == 1
    # Telegram delivers a command again (it was not confirmed before the crash): no new task.
    await second.extend(bot_aiogram.Job(10, 1, 5), "123 rain")
    for task_id in task_ids:
        sim.finish_task(task_id)
    await until(lambda: chat.texts(11)[-1].startswith("Done:"), "the second result")
    await until(lambda: chat.texts(10)[-1].startswith("Done:"), "the first result")
    assert chat.texts(10)[1] == f"Back online; still following task {task_ids[0]}."
    assert sim.counters.tasks_created == 2
    await second.aclose()


async def test_bot_resume_skips_finished_foreign_and_old_tasks(
    sim: Simulator, kling: KlingClient
) -> None:
    chat = Chat()
    await kling.extend_video("1", "not the bot's")  # no tg- external id
    done = await kling.extend_video("2", "finished", external_task_id="tg-1-1-1")
    await kling.wait_for_task(done)
    bot = bot_aiogram.ExtendBot(kling, chat.reply)
    assert await bot.resume() == 0
    sim.processing_time = 30.0
    await kling.extend_video("3", "old", external_task_id="tg-1-2-1")
    later = bot_aiogram.ExtendBot(kling, chat.reply)
    assert await later.resume(lookback=timedelta(0)) == 0  # created before "now - 0"
    assert await later.resume() == 1
    assert chat.said == [(1, f"Back online; still following task {list(sim.tasks)[-1]}.")]
    await later.aclose()


async def test_bot_aiogram_wiring_turns_a_command_into_an_extension(
    sim: Simulator, kling: KlingClient
) -> None:
    from aiogram import Bot, Dispatcher
    from aiogram.types import Chat as TelegramChat
    from aiogram.types import Message, Update, User

    chat = Chat()
    logic = bot_aiogram.ExtendBot(kling, chat.reply)
    dispatcher = Dispatcher()
    dispatcher.include_router(bot_aiogram.make_router(logic))
    bot = Bot(token="123456:TEST-token-never-sent")  # the handlers reply through `chat`
    message = Message(
        message_id=77,
        date=datetime.now(timezone.utc),
        chat=TelegramChat(id=-500, type="group"),
        from_user=User(id=8, is_bot=False, first_name="Ana"),
        text="/extend 828006748715380777 and then it rains",
    )
    try:
        await dispatcher.feed_update(bot, Update(update_id=1, message=message))
        other = message.model_copy(update={"message_id": 78, "text": "hello"})
        await dispatcher.feed_update(bot, Update(update_id=2, message=other))
        await until(lambda: chat.texts(-500)[-1].startswith("Done:"), "the result")
    finally:
        await logic.aclose()
        await bot.session.close()
    assert sim.task_by_external_id("tg--500-77-8") is not None
    assert sim.counters.tasks_created == 1
    assert callable(bot_aiogram.main)


# -- generated reference -----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "  "])  # unset; blank (stripped)
def test_bot_without_a_token_says_so_and_exits(token: str | None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TELEGRAM_BOT_TOKEN"}
    if token is not None:
        env["TELEGRAM_BOT_TOKEN"] = token
    ran = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bot_aiogram.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,  # an aiogram import under coverage on a busy machine is slow
        check=False,
    )
    assert ran.returncode == 1
    assert ran.stderr.startswith("TELEGRAM_BOT_TOKEN is not set:"), ran.stderr
    assert "Traceback" not in ran.stderr


def test_errors_table_has_a_row_per_code_of_the_protocol(hooks: ModuleType) -> None:
    from kling_async._protocol import ERROR_CODES

    table = hooks.error_codes_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(ERROR_CODES)
    for row, rule in zip(rows, ERROR_CODES, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:2] == [str(rule.status), str(rule.code)]
        assert f"kling_async.errors.{rule.error.__name__}]" in cells[3]
        assert cells[4] == ("yes" if rule.retryable else "no")
    page = (ROOT / "docs/reference/errors.md").read_text(encoding="utf-8")
    assert hooks.ERROR_CODES_MARKER in page
    rendered = hooks.on_page_markdown(page, page=None, config=None, files=None)
    assert table in rendered
    assert hooks.ERROR_CODES_MARKER not in rendered


def test_polling_page_shows_the_numbers_the_policy_gives(hooks: ModuleType) -> None:
    page = (ROOT / "docs/guide/polling.md").read_text(encoding="utf-8")
    assert hooks.polling_table() in page
    assert hooks.look_times_text() in page


def test_polling_numbers_follow_the_clients_own_schedule(hooks: ModuleType) -> None:
    # The computation on the page against the intervals `wait_for_task` really sleeps.
    policy = PollPolicy(jitter=0.0)
    client = KlingClient(api_key="k", base_url="http://127.0.0.1:9", poll=policy)
    real = client._tasks.intervals()
    computed = hooks.poll_intervals(policy)
    assert [next(real) for _ in range(12)] == pytest.approx([next(computed) for _ in range(12)])
    assert hooks.look_times(PollPolicy(), 10)[:3] == [2.0, 5.0, 9.5]


def test_polling_rows_by_hand(hooks: ModuleType) -> None:
    row = hooks.polling_row(PollPolicy(), 120.0)
    # Looks at 2, 5, 9.5, 16.25, 26.375, then every 15 s: 41.375 ... 116.375, 131.375.
    assert row.polls == 12
    assert row.late_worst == pytest.approx(15.0)
    assert row.late_average == pytest.approx(7.5)
    # With callbacks, backstop looks at 6, 15, 28.5, 48.75, 79.125 (then 124.125).
    assert row.backstop_polls == 5
    assert row.backstop_late_worst == pytest.approx(45.0)


def test_cli_reference_names_a_click_group_that_exists() -> None:
    page = (ROOT / "docs/reference/cli.md").read_text(encoding="utf-8")
    module = re.search(r":module: (\S+)", page)
    command = re.search(r":command: (\S+)", page)
    assert module is not None
    assert command is not None
    import click

    group = getattr(importlib.import_module(module.group(1)), command.group(1))
    assert isinstance(group, click.Group)
    assert {"extend", "status", "wait", "list", "batch", "download", "simulate"} <= set(
        group.commands
    )


def test_polling_page_prose_matches_the_numbers(hooks: ModuleType) -> None:
    page = " ".join((ROOT / "docs/guide/polling.md").read_text(encoding="utf-8").split())
    policy = PollPolicy()
    five_minutes = hooks.polling_row(policy, 300.0)
    assert (
        f"a 5-minute task costs {five_minutes.backstop_polls} requests instead of "
        f"{five_minutes.polls}" in page
    )
    gaps = hooks.poll_intervals(policy, scale=3.0)
    shown = ", ".join(f"{next(gaps):g}" for _ in range(5))
    assert f"(gaps of {shown}, then {next(gaps):g} s)" in page
    assert f"at most {five_minutes.backstop_late_worst:g} s late" in page


@pytest.mark.parametrize(
    ("page", "program"),
    [
        ("docs/guide/web-services.md", "examples/web_aiohttp.py"),
        ("docs/guide/web-services.md", "examples/web_fastapi.py"),
        ("docs/guide/bots.md", "examples/bot_aiogram.py"),
        ("docs/guide/many-workers.md", "examples/arq_worker.py"),
        ("docs/guide/many-workers.md", "examples/arq_producer.py"),
    ],
)
def test_guides_show_the_programs_the_tests_run(page: str, program: str) -> None:
    # The page includes the file at build time, so the reader sees what was tested.
    assert f'--8<-- "{program}"' in (ROOT / page).read_text(encoding="utf-8")
