"""Many workers, one Kling account: an arq worker that extends videos through one RedisAccount.

Start as many workers as you like, on any number of hosts (they share the account's
running-task slots through Redis)::

    REDIS_URL=redis://localhost:6379/0 KLING_API_KEY=... arq arq_worker.WorkerSettings

then enqueue one job per video with ``python arq_producer.py videos.jsonl``.

Settings (environment): ``REDIS_URL``, ``KLING_MAX_RUNNING`` (your plan's limit; leave
it out to learn it from 1303 answers), ``KLING_DOWNLOADS`` (where videos are saved), and
the client's usual ``KLING_API_KEY`` or ``KLING_ACCESS_KEY``/``KLING_SECRET_KEY``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings

from kling_async import ExtendRequest, KlingClient
from kling_async.redis import RedisAccount

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")


async def startup(ctx: dict[str, Any]) -> None:
    max_running = os.environ.get("KLING_MAX_RUNNING")
    # One account and one client per worker process, shared by all its jobs.
    ctx["account"] = RedisAccount(
        REDIS_URL, name="kling", max_running=int(max_running) if max_running else None
    )
    ctx["kling"] = KlingClient(account=ctx["account"])
    ctx["downloads"] = Path(os.environ.get("KLING_DOWNLOADS", "videos"))
    ctx["downloads"].mkdir(parents=True, exist_ok=True)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["kling"].aclose()
    await ctx["account"].aclose()


async def extend_video(ctx: dict[str, Any], video_id: str, prompt: str) -> dict[str, str]:
    """One job: extend a video, wait for the result and download it."""
    kling: KlingClient = ctx["kling"]
    # The job id as external task id: a job arq runs again (a worker died mid-job)
    # claims the same id, so it gets the task already created instead of a second one.
    request = ExtendRequest(video_id, prompt, external_task_id=f"arq-{ctx['job_id']}")
    task = await kling.extend_and_wait(request)
    path = await kling.download(task, ctx["downloads"])
    return {"video_id": video_id, "task_id": task.task_id, "file": str(path)}


class WorkerSettings:
    """``arq arq_worker.WorkerSettings`` runs this worker."""

    functions = [extend_video]  # noqa: RUF012 - arq reads these class attributes
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = 16  # jobs at once per worker; the account keeps the total within the plan
    job_timeout = 1800  # a job waits for a slot and then for its task
