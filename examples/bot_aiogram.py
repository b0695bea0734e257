"""A Telegram bot that extends videos: ``/extend <video id> <prompt>``, on aiogram 3.

It answers at once, posts progress and the result, lets each user run a few extensions
at a time, and survives a restart: every task's ``external_task_id`` is made from the
chat, the message and the user, so a restarted bot finds its unfinished tasks again in
Kling's task list (`ExtendBot.resume`), and a command Telegram delivers twice creates
one task (`get_task(external_task_id=...)` first).

`ExtendBot` is the logic (it needs a `KlingClient` and a ``reply(chat_id, text)``
callable, nothing of Telegram's); `make_router` and `main` wire it to aiogram. Run it::

    TELEGRAM_BOT_TOKEN=... KLING_API_KEY=... python examples/bot_aiogram.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from aiogram import Bot, Dispatcher, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from kling_async import (
    ConfigurationError,
    InsufficientBalanceError,
    KlingClient,
    KlingError,
    NotFoundError,
    Task,
    TaskFailedError,
    TaskStatus,
    ValidationError,
    WaitTimeoutError,
)

logger = logging.getLogger(__name__)

#: Sends `text` to a chat (in `main`, `Bot.send_message`).
Reply = Callable[[int, str], Awaitable[object]]

USAGE = "Usage: /extend <video id> <prompt>"
_JOB_ID = re.compile(r"tg-(-?\d+)-(\d+)-(\d+)")


class Job(NamedTuple):
    """Who asked for an extension: the chat, the command's message and the user."""

    chat_id: int
    message_id: int
    user_id: int

    @property
    def external_task_id(self) -> str:
        # Unique per command, and the same when Telegram delivers the command again.
        return f"tg-{self.chat_id}-{self.message_id}-{self.user_id}"

    @classmethod
    def from_task(cls, task: Task) -> Job | None:
        """The job a task was started for, if this bot started it."""
        found = _JOB_ID.fullmatch(task.external_task_id or "")
        return cls(*map(int, found.groups())) if found else None


class ExtendBot:
    """The bot's logic: start extensions, follow them, tell the user.

    Args:
        kling: the client (one for the bot's whole life).
        reply: sends a text to a chat.
        max_running: the most extensions one user may have running at once.
        timeout: seconds to follow one task before giving up on it.
    """

    def __init__(
        self, kling: KlingClient, reply: Reply, *, max_running: int = 3, timeout: float = 1800.0
    ) -> None:
        self.kling = kling
        self.reply = reply
        self.max_running = max_running
        self.timeout = timeout
        self._running: dict[int, set[Job]] = {}  # by user id
        self._followers: set[asyncio.Task[None]] = set()

    def running(self, user_id: int) -> int:
        """How many extensions `user_id` has running."""
        return len(self._running.get(user_id, ()))

    async def extend(self, job: Job, args: str | None) -> None:
        """Handle ``/extend <video id> <prompt>`` (`args` is the text after the command)."""
        video_id, _, prompt = (args or "").strip().partition(" ")
        if not video_id or not prompt.strip():
            await self.reply(job.chat_id, USAGE)
            return
        mine = self._running.setdefault(job.user_id, set())
        if job in mine:
            return  # the same command again while we follow it
        if len(mine) >= self.max_running:
            await self.reply(
                job.chat_id,
                f"You have {len(mine)} extensions running; wait for one to finish.",
            )
            return
        mine.add(job)  # before any await: two commands at once cannot both pass the limit
        try:
            task = await self._start(job, video_id, prompt.strip())
        except ValidationError as error:
            self._release(job)
            await self.reply(job.chat_id, f"Cannot extend that: {error}")
            return
        except InsufficientBalanceError:
            self._release(job)
            await self.reply(job.chat_id, "The bot is out of credit; try again later.")
            return
        except KlingError as error:
            self._release(job)
            logger.warning("could not start %s: %s", job.external_task_id, error)
            await self.reply(job.chat_id, f"Could not start the extension: {error}")
            return
        await self.reply(job.chat_id, f"Started task {task.task_id}; I will post the result.")
        self._follow(job, task)

    async def _start(self, job: Job, video_id: str, prompt: str) -> Task:
        # Telegram delivers an update again when the bot died before confirming it: the
        # task may exist already. Its external_task_id says so, and nothing is created.
        try:
            return await self.kling.get_task(external_task_id=job.external_task_id)
        except NotFoundError:
            return await self.kling.extend_video(
                video_id, prompt, external_task_id=job.external_task_id
            )

    async def resume(self, *, lookback: timedelta = timedelta(days=1)) -> int:
        """Follow again this bot's unfinished tasks created in the last `lookback`.

        Call it at startup. Returns how many tasks it follows again.
        """
        since = datetime.now(timezone.utc) - lookback
        resumed = 0
        async for task in self.kling.iter_tasks():  # newest first
            if task.created_at is not None and task.created_at < since:
                break
            job = Job.from_task(task)
            if job is None or task.is_terminal or job in self._running.get(job.user_id, ()):
                continue
            self._running.setdefault(job.user_id, set()).add(job)
            await self.reply(job.chat_id, f"Back online; still following task {task.task_id}.")
            self._follow(job, task)
            resumed += 1
        return resumed

    def _follow(self, job: Job, task: Task) -> None:
        follower = asyncio.create_task(self._wait(job, task), name=job.external_task_id)
        self._followers.add(follower)  # a reference, or the loop may drop it
        follower.add_done_callback(self._followers.discard)

    async def _wait(self, job: Job, task: Task) -> None:
        async def progress(update: Task) -> None:
            if update.status is TaskStatus.PROCESSING:
                await self.reply(job.chat_id, f"Task {update.task_id} is processing…")

        try:
            done = await self.kling.wait_for_task(task, timeout=self.timeout, on_update=progress)
        except TaskFailedError as error:
            text = f"Task {task.task_id} failed: {error.task.status_message or 'no reason given'}"
        except WaitTimeoutError:
            text = f"Task {task.task_id} is taking too long; I stopped waiting."
        except KlingError as error:
            text = f"Lost track of task {task.task_id}: {error}"
        else:
            video = done.videos[0]
            text = f"Done: {video.url} ({video.duration:g} s)"
        self._release(job)
        await self.reply(job.chat_id, text)

    def _release(self, job: Job) -> None:
        self._running.get(job.user_id, set()).discard(job)

    async def aclose(self) -> None:
        """Stop following (at shutdown): the tasks go on, and `resume` finds them again."""
        for follower in self._followers:
            follower.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)


def make_router(logic: ExtendBot) -> Router:
    """The aiogram side: turn ``/extend`` messages into `ExtendBot.extend` calls."""
    router = Router(name="kling")

    @router.message(Command("extend"))
    async def on_extend(message: Message, command: CommandObject) -> None:
        user_id = message.from_user.id if message.from_user is not None else message.chat.id
        job = Job(chat_id=message.chat.id, message_id=message.message_id, user_id=user_id)
        await logic.extend(job, command.args)

    return router


#: Said, and the program exits, when the bot has no token.
HOW_TO_START = (
    "TELEGRAM_BOT_TOKEN is not set: it is the token @BotFather gave your bot. Run\n"
    "    TELEGRAM_BOT_TOKEN=... KLING_API_KEY=... python examples/bot_aiogram.py\n"
    "(or, to try it against the simulator, KLING_BASE_URL and KLING_API_KEY from the line "
    "`kling-async simulate` prints)"
)


async def main(token: str) -> None:
    logging.basicConfig(level=logging.INFO)
    bot = Bot(token=token)
    async with KlingClient() as kling:
        logic = ExtendBot(kling, reply=lambda chat_id, text: bot.send_message(chat_id, text))
        dispatcher = Dispatcher()
        dispatcher.include_router(make_router(logic))
        try:
            await logic.resume()
            await dispatcher.start_polling(bot)  # until SIGINT/SIGTERM
        finally:
            await logic.aclose()
            await bot.session.close()


def run() -> None:
    """Start the bot, or say in one line what it needs and exit."""
    token = os.environ.get("TELEGRAM_BOT_TOKEN", "").strip()
    if not token:
        sys.exit(HOW_TO_START)
    try:
        asyncio.run(main(token))
    except ConfigurationError as error:  # no Kling credentials: the error names them
        sys.exit(f"cannot start the bot: {error}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
