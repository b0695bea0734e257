"""Video extensions behind a FastAPI service: one client for the app's lifespan, polling.

    POST /extensions  {"video_id": "...", "prompt": "..."}  -> 202 {"task_id", "status_url"}
    GET  /extensions/{task_id}                              -> 200 {"status", "videos", ...}

`kling_async.callbacks.CallbackReceiver` is an aiohttp handler, which an ASGI app cannot
mount, so this service follows each task with `wait_for_task` (polling) in a background
task, and answers status requests from what those found. Run it with uvicorn::

    KLING_API_KEY=... uvicorn examples.web_fastapi:app
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from kling_async import (
    ContentPolicyError,
    ExtendRequest,
    InvalidRequestError,
    KlingClient,
    KlingError,
    NotFoundError,
    PollPolicy,
    RateLimitError,
    Task,
    TaskFailedError,
    ValidationError,
    WaitTimeoutError,
)

logger = logging.getLogger(__name__)

#: Seconds a caller is told to wait before asking about a running task again.
RETRY_AFTER = "5"
#: One HTTP request to Kling may take this long, and is retried at most twice.
KLING_TIMEOUT = 10.0
KLING_RETRIES = 2
#: Longest a background watcher follows one task (Kling's own take minutes).
WATCH_TIMEOUT = 1800.0


class Extension(BaseModel):
    video_id: str
    prompt: str


class Watchers:
    """Background tasks that follow each started extension to its end."""

    def __init__(self, kling: KlingClient) -> None:
        self.kling = kling
        #: Finished tasks, by task id (a real service would keep them in its database).
        self.finished: dict[str, Task] = {}
        self._running: set[asyncio.Task[None]] = set()

    def watch(self, task: Task) -> None:
        watcher = asyncio.create_task(self._follow(task), name=f"watch {task.task_id}")
        self._running.add(watcher)  # keep a reference: the loop holds only a weak one
        watcher.add_done_callback(self._running.discard)

    async def _follow(self, task: Task) -> None:
        try:
            done = await self.kling.wait_for_task(task, timeout=WATCH_TIMEOUT)
        except TaskFailedError as error:
            done = error.task
        except WaitTimeoutError:
            logger.warning("task %s still running after %gs", task.task_id, WATCH_TIMEOUT)
            return
        except KlingError:
            logger.exception("following task %s failed", task.task_id)
            return
        self.finished[done.task_id] = done  # e.g. store it, notify someone, download it

    async def aclose(self) -> None:
        """Stop following: the tasks go on at Kling, and GET looks them up there."""
        for watcher in self._running:
            watcher.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


def create_app(*, poll: PollPolicy | None = None) -> FastAPI:
    """The application; `poll` is how often the watchers look (default `PollPolicy()`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One client per process, for the app's whole life: never one per request.
        async with KlingClient(
            timeout=KLING_TIMEOUT, max_retries=KLING_RETRIES, poll=poll
        ) as kling:
            app.state.kling = kling
            app.state.watchers = Watchers(kling)
            try:
                yield
            finally:
                # Shutdown with tasks in flight: stop the watchers before the client closes.
                await app.state.watchers.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/extensions", status_code=202)
    async def start_extension(extension: Extension, request: Request) -> JSONResponse:
        """Start an extension and answer at once: 202 with the task id and where to look."""
        watchers: Watchers = request.app.state.watchers
        try:
            task = await watchers.kling.extend(
                ExtendRequest(video_id=extension.video_id, prompt=extension.prompt)
            )
        except ValidationError as error:
            return problem(422, str(error))
        except KlingError as error:
            return kling_problem(error)
        watchers.watch(task)
        status_url = str(request.app.url_path_for("show_extension", task_id=task.task_id))
        return JSONResponse(
            {**describe(task), "status_url": status_url},
            status_code=202,
            headers={"Location": status_url, "Retry-After": RETRY_AFTER},
        )

    @app.get("/extensions/{task_id}")
    async def show_extension(task_id: str, request: Request) -> JSONResponse:
        """Report a task: from its watcher once finished, else asked of Kling."""
        watchers: Watchers = request.app.state.watchers
        task = watchers.finished.get(task_id)
        if task is None:
            try:
                task = await watchers.kling.get_task(task_id)
            except NotFoundError:
                return problem(404, f"no task {task_id}")
            except KlingError as error:
                return kling_problem(error)
        headers = {} if task.is_terminal else {"Retry-After": RETRY_AFTER}
        return JSONResponse(describe(task), headers=headers)

    return app


def describe(task: Task) -> dict[str, Any]:
    """What a caller sees of a task."""
    return {
        "task_id": task.task_id,
        "status": task.status.value,
        "message": task.status_message,
        "videos": [
            {"id": video.id, "url": video.url, "duration": video.duration} for video in task.videos
        ],
    }


def problem(status: int, detail: str, *, retry_after: str | None = None) -> JSONResponse:
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def kling_problem(error: KlingError) -> JSONResponse:
    """Our answer when Kling said no (or could not be reached), once retries are spent."""
    if isinstance(error, (InvalidRequestError, ContentPolicyError, NotFoundError)):
        return problem(422, str(error))
    if isinstance(error, RateLimitError):
        return problem(429, "too many extensions running; try again later", retry_after="30")
    logger.error("Kling failed: %s", error)
    return problem(503, "video extension is unavailable now", retry_after="60")


app = create_app()
