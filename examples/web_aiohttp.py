"""Video extensions behind an aiohttp web service: one client, callbacks on a route.

    POST /extensions  {"video_id": "...", "prompt": "..."}  -> 202 {"task_id", "status_url"}
    GET  /extensions/{task_id}                              -> 200 {"status", "videos", ...}
    POST /kling/callback                                    <- Kling's task callbacks

Run it with ``KLING_API_KEY`` (or ``KLING_ACCESS_KEY``/``KLING_SECRET_KEY``) set, and
``PUBLIC_URL`` set to the address Kling can reach this service at::

    PUBLIC_URL=https://videos.example.com python examples/web_aiohttp.py
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from kling_async import (
    ContentPolicyError,
    ExtendRequest,
    InvalidRequestError,
    KlingClient,
    KlingError,
    NotFoundError,
    RateLimitError,
    Task,
    ValidationError,
)
from kling_async.callbacks import CallbackReceiver

logger = logging.getLogger(__name__)

KLING = web.AppKey("kling", KlingClient)
RECEIVER = web.AppKey("receiver", CallbackReceiver)
PUBLIC_URL = web.AppKey("public_url", str)

#: Seconds a caller is told to wait before asking about a running task again.
RETRY_AFTER = "5"
#: One HTTP request to Kling may take this long (connect, answer, each read), and is
#: retried at most twice: a caller of ours is not kept waiting for minutes.
KLING_TIMEOUT = 10.0
KLING_RETRIES = 2


async def kling_client(app: web.Application) -> AsyncIterator[None]:
    """The app's one `KlingClient`, opened at startup and closed at shutdown."""
    # One client per process: it holds the connection pool, the in-flight limit and the
    # signed JWT. A client per request would pay a TLS handshake and a new JWT each time.
    async with KlingClient(timeout=KLING_TIMEOUT, max_retries=KLING_RETRIES) as kling:
        app[KLING] = kling
        yield
    # Closed after the last request handler finished (aiohttp's graceful shutdown).
    # Tasks still running at Kling are not lost: they go on there, and GET
    # /extensions/{id} looks them up after a restart.


def create_app(public_url: str | None = None) -> web.Application:
    """The web application.

    Args:
        public_url: the address Kling can reach this service at (callbacks go to
            ``{public_url}/kling/callback``). None: the address each request came to,
            which is right only when nothing (a proxy) stands in between.
    """
    app = web.Application()
    app[RECEIVER] = CallbackReceiver()
    app[RECEIVER].add_to(app)  # POST /kling/callback
    if public_url is not None:
        app[PUBLIC_URL] = public_url.rstrip("/")
    app.cleanup_ctx.append(kling_client)
    app.router.add_post("/extensions", start_extension)
    app.router.add_get("/extensions/{task_id}", show_extension, name="extension")
    return app


async def start_extension(request: web.Request) -> web.Response:
    """Start an extension and answer at once: 202 with the task id and where to look."""
    try:
        body = await request.json()
    except ValueError:
        return problem(400, "the body must be JSON")
    if not isinstance(body, dict):
        return problem(400, "the body must be a JSON object")
    public_url = request.app.get(PUBLIC_URL) or str(request.url.origin())
    receiver = request.app[RECEIVER]
    try:
        extend = ExtendRequest(
            video_id=body.get("video_id", ""),
            prompt=body.get("prompt", ""),
            callback_url=public_url + receiver.path,
        )
        # Only the create: waiting for the result (minutes) inside a request would
        # outlast any caller's and proxy's timeout.
        task = await request.app[KLING].extend(extend)
    except ValidationError as error:
        return problem(422, str(error))
    except KlingError as error:
        return kling_problem(error)
    status_url = str(request.app.router["extension"].url_for(task_id=task.task_id))
    return web.json_response(
        {**describe(task), "status_url": status_url},
        status=202,
        headers={"Location": status_url, "Retry-After": RETRY_AFTER},
    )


async def show_extension(request: web.Request) -> web.Response:
    """Report a task: from its latest callback when finished, else asked of Kling."""
    task_id = request.match_info["task_id"]
    task = request.app[RECEIVER].latest(task_id)
    if task is None or not task.is_terminal:
        # A callback may be late or lost: ask Kling (one request) while it runs.
        try:
            task = await request.app[KLING].get_task(task_id)
        except NotFoundError:
            return problem(404, f"no task {task_id}")
        except KlingError as error:
            return kling_problem(error)
    headers = {} if task.is_terminal else {"Retry-After": RETRY_AFTER}
    return web.json_response(describe(task), headers=headers)


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


def problem(status: int, detail: str, *, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.json_response({"error": detail}, status=status, headers=headers)


def kling_problem(error: KlingError) -> web.Response:
    """Our answer when Kling said no (or could not be reached), once retries are spent."""
    if isinstance(error, (InvalidRequestError, ContentPolicyError, NotFoundError)):
        return problem(422, str(error))  # the caller's input: they can fix it
    if isinstance(error, RateLimitError):
        return problem(429, "too many extensions running; try again later", retry_after="30")
    # No credit, a bad key, Kling down: not the caller's fault, and not theirs to fix.
    logger.error("Kling failed: %s", error)
    return problem(503, "video extension is unavailable now", retry_after="60")


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app = create_app(public_url=os.environ.get("PUBLIC_URL"))
    # On SIGTERM/SIGINT aiohttp stops accepting, lets running handlers finish (up to
    # shutdown_timeout seconds), then runs the cleanup contexts: the client closes last.
    web.run_app(app, port=int(os.environ.get("PORT", "8080")), shutdown_timeout=30.0)


if __name__ == "__main__":
    main()
