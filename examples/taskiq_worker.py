"""Many workers, one Kling account, on Taskiq: a broker and jobs that extend, wait, download.

Start as many workers as you like, on any number of hosts (they share the account's
running-task slots through Redis)::

    REDIS_URL=redis://localhost:6379/0 KLING_API_KEY=... taskiq worker taskiq_worker:broker

then enqueue one job per video with ``python taskiq_producer.py videos.jsonl``.

Settings (environment): ``REDIS_URL``, ``KLING_MAX_RUNNING`` (your plan's limit; leave
it out to learn it from 1303 answers), ``KLING_DOWNLOADS`` (where videos are saved), and
the client's usual ``KLING_API_KEY`` or ``KLING_ACCESS_KEY``/``KLING_SECRET_KEY``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from taskiq import Context, TaskiqDepends, TaskiqEvents, TaskiqState
from taskiq.middlewares import SimpleRetryMiddleware
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from kling_async import ExtendRequest, KlingClient
from kling_async.redis import RedisAccount

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

broker = (
    ListQueueBroker(REDIS_URL)
    .with_result_backend(RedisAsyncResultBackend(REDIS_URL, result_ex_time=86_400))
    # Taskiq's own retries: a failed job is sent again, with the same task id.
    .with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state: TaskiqState) -> None:
    max_running = os.environ.get("KLING_MAX_RUNNING")
    # One account and one client per worker process, shared by all its jobs.
    state.account = RedisAccount(
        REDIS_URL, name="kling", max_running=int(max_running) if max_running else None
    )
    state.kling = KlingClient(account=state.account)
    state.downloads = Path(os.environ.get("KLING_DOWNLOADS", "videos"))
    state.downloads.mkdir(parents=True, exist_ok=True)


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def shutdown(state: TaskiqState) -> None:
    await state.kling.aclose()
    await state.account.aclose()


@broker.task(retry_on_error=True)
async def extend_video(
    video_id: str, prompt: str, context: Annotated[Context, TaskiqDepends()]
) -> dict[str, str]:
    """One job: extend a video, wait for the result and download it."""
    kling: KlingClient = context.state.kling
    # Taskiq delivers at least once, and its retry middleware sends a failed job again
    # with the same task id: as the external task id, it makes every delivery of the job
    # find the task the first one created instead of creating (and paying for) another.
    request = ExtendRequest(video_id, prompt, external_task_id=f"taskiq-{context.message.task_id}")
    task = await kling.extend_and_wait(request)
    path = await kling.download(task, context.state.downloads, overwrite=True)
    return {"video_id": video_id, "task_id": task.task_id, "file": str(path)}
