"""Kling's task callbacks: an aiohttp handler that verifies, de-duplicates and delivers them.

Kling POSTs a task (the same object as `get_task`'s ``data``) to a task's
``callback_url`` on every status change. `CallbackReceiver` is the handler for that
URL: it checks Standard Webhooks signatures when a secret is set, answers a repeated
``webhook-id`` without delivering it twice, reads both callback formats (the legacy
task object and the newer ``id``/``status``/``outputs`` one) into a `Task`, and hands
each task to its subscribers, to an optional ``on_task`` hook and to `latest`.

```python
from aiohttp import web
from kling_async.callbacks import CallbackReceiver

receiver = CallbackReceiver(url="https://example.com/kling/callback")
app = web.Application()
app.router.add_post("/kling/callback", receiver)  # or receiver.add_to(app)
...
done = await kling.extend_and_wait(request, callbacks=receiver)
```

The signature check and the parsing are a pure function, `parse_callback` (or a
`CallbackVerifier` kept for one secret), for other web frameworks: read the raw body
and the headers, call it, answer 401 on `InvalidSignatureError` and 400 on
`ResponseFormatError`.

`wait_for_task(..., callbacks=receiver)` keeps polling (more slowly) alongside, so a
lost callback never loses a task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from kling_async import _telemetry
from kling_async._config import is_int_in, is_text
from kling_async._deadlines import within
from kling_async._hooks import call_back
from kling_async._models import Task, is_http_url
from kling_async._types import OnUpdate
from kling_async._webhooks import CallbackVerifier, InvalidSignatureError, parse_callback
from kling_async.errors import ConfigurationError, ResponseFormatError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CallbackReceiver",
    "CallbackVerifier",
    "InvalidSignatureError",
    "TaskSubscription",
    "parse_callback",
]

logger = logging.getLogger("kling_async")

#: The environment variable a `CallbackReceiver` reads its secret from.
SECRET_ENV: Final = "KLING_WEBHOOK_SECRET"  # noqa: S105 (a variable name, not a secret)
#: Updates a subscription holds before it drops the oldest (only the newest matter).
SUBSCRIPTION_QUEUE_SIZE: Final = 64

_READ_CHUNK: Final = 64 * 1024

#: A hook told about every delivered task: sync or async (the same type as `on_update`).
OnTask = OnUpdate


class _BodyTooLarge(Exception):
    pass


class TaskSubscription:
    """The updates of one task, collected from the moment `CallbackReceiver.subscribe` is called.

    It holds at most the newest few updates (older ones are dropped first). Use it as a
    context manager, or call `close` when done.
    """

    def __init__(self, receiver: CallbackReceiver, task_id: str) -> None:
        self.task_id = task_id
        self._receiver = receiver
        self._queue: asyncio.Queue[Task] = asyncio.Queue(SUBSCRIPTION_QUEUE_SIZE)
        self._closed = False
        #: The span of the wait that subscribed (telemetry), for the callback's link.
        self._waiting_span = _telemetry.current_context() if _telemetry.AVAILABLE else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._queue.qsize()} pending"
        return f"<TaskSubscription {self.task_id} {state}>"

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def _put(self, task: Task) -> None:
        # Only the newest states matter: when full, the oldest update makes room.
        if self._closed:
            return
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(task)

    async def next(self, timeout: float) -> Task | None:
        """The next update that arrives within `timeout` seconds, else None.

        A closed subscription answers None at once.
        """
        if self._closed:
            return None
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await within(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        """Stop collecting updates (safe to repeat)."""
        if not self._closed:
            self._closed = True
            self._receiver._unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CallbackReceiver:
    """Receives Kling's task callbacks: an aiohttp handler to mount, or to `serve` alone.

    The receiver itself is the handler: ``app.router.add_post(path, receiver)``;
    `add_to` does that for its `path`, and `handle` is the same handler by name.

    Args:
        secret: the webhook signing secret (``whsec_...``). When None, read from
            ``KLING_WEBHOOK_SECRET`` (an empty value counts as unset). With a secret,
            every callback must carry valid ``webhook-id``/``webhook-timestamp``/
            ``webhook-signature`` headers (timestamp within 5 minutes; any one of several
            space-separated signatures may match); without one, nothing is verified.
        url: the public URL Kling should POST to (the `url` property). Without it, the
            URL is the address `serve` listens on.
        path: the route `add_to` and `serve` mount the handler on.
        max_body_size: the largest body accepted, in bytes (larger: 413).
        remember_ids: how many ``webhook-id``s (to answer repeats without delivering
            them again) and how many tasks' latest states (`latest`) are kept.
        on_task: called (sync or async) with every delivered task. If it raises, the
            sender gets a 500 (so it can retry) and the ``webhook-id`` is not remembered.

    Raises:
        ConfigurationError: the secret is not one standardwebhooks accepts, or another
            argument is unusable.
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        url: str | None = None,
        path: str = "/kling/callback",
        max_body_size: int = 1 << 20,
        remember_ids: int = 10_000,
        on_task: OnTask | None = None,
    ) -> None:
        self._verifier = _verifier_for(secret)
        if url is not None and not is_http_url(url):
            raise ConfigurationError("url must be an absolute http(s) URL")
        if not is_text(path) or not path.startswith("/"):
            raise ConfigurationError("path must be a string starting with '/'")
        for name, value in (("max_body_size", max_body_size), ("remember_ids", remember_ids)):
            if not is_int_in(value, 1):
                raise ConfigurationError(f"{name} must be an integer of at least 1")
        if on_task is not None and not callable(on_task):
            raise ConfigurationError("on_task must be callable")
        self.path = path
        self.max_body_size = max_body_size
        self.remember_ids = remember_ids
        self._url = url
        self._served_url: str | None = None
        self._on_task = on_task
        self._seen_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._latest: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._subscriptions: dict[str, set[TaskSubscription]] = {}
        _mark_as_handler(self)

    def __repr__(self) -> str:
        mode = "verifying signatures" if self.verifies_signatures else "unsigned"
        where = self._url or self._served_url or "no url"
        return f"<CallbackReceiver {where} path={self.path} {mode}>"

    @property
    def verifies_signatures(self) -> bool:
        """True when a secret is set and every callback's signature is checked."""
        return self._verifier.verifies_signatures

    @property
    def url(self) -> str:
        """The public URL Kling should POST to: the `url` argument, else the served address.

        Raises:
            ConfigurationError: no `url` was given and the receiver is not being served.
        """
        url = self._url or self._served_url
        if url is None:
            raise ConfigurationError(
                "CallbackReceiver has no URL: pass url= (the public address Kling can "
                "reach, ending in the receiver's path) or run it with `async with "
                "receiver.serve()`"
            )
        return url

    # -- mounting ----------------------------------------------------------------------

    def add_to(self, app: web.Application) -> None:
        """Mount the receiver on ``POST`` `path` of an aiohttp application."""
        app.router.add_post(self.path, self)

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve the receiver alone on `host`:`port` (0 picks a free port).

        Yields the URL it serves (``http://host:port/path``), which is also `url` unless
        a `url` was given. Everything is shut down when the block ends.
        """
        if self._served_url is not None:
            raise RuntimeError("this CallbackReceiver is already being served")
        app = web.Application()
        self.add_to(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_port = runner.addresses[0][1]
            shown_host = f"[{host}]" if ":" in host else host
            served = f"http://{shown_host}:{bound_port}{self.path}"
            self._served_url = served
            yield served
        finally:
            self._served_url = None
            await runner.cleanup()

    # -- the handler -------------------------------------------------------------------

    async def __call__(self, request: web.Request) -> web.Response:
        """The aiohttp handler for Kling's POSTs.

        Answers 413 to a body over `max_body_size`, 401 to a missing or bad signature
        (when a secret is set), 400 to a body that is not a task, 200 to a
        ``webhook-id`` already delivered (without delivering it again), 500 when
        ``on_task`` raised, and 200 ``{"ok": true}`` once the task is delivered.
        """
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            logger.warning("callback rejected: body over %d bytes", self.max_body_size)
            return _answer(413, "body too large", close=True)
        try:
            task = self._verifier.parse(body, request.headers)
        except InvalidSignatureError:
            logger.warning("callback rejected: missing or invalid webhook signature")
            return _answer(401, "invalid signature")
        except ResponseFormatError as error:
            logger.warning("callback rejected: %s", error)
            return _answer(400, str(error))
        message_id = request.headers.get("webhook-id") or None
        if message_id is not None and message_id in self._seen_ids:
            self._seen_ids.move_to_end(message_id)
            logger.info("callback %r already delivered; not delivering it again", message_id)
            return _answer(200, None, duplicate=True)
        # Nothing awaited since the duplicate check, so two copies cannot race.
        if message_id is not None:
            self._remember_id(message_id)
        self._deliver(task)
        try:
            await call_back(self._on_task, task)
        except Exception:
            logger.exception("on_task failed for task %s", task.task_id)
            if message_id is not None:
                self._seen_ids.pop(message_id, None)  # let the sender's retry through
            return _answer(500, "on_task failed")
        return _answer(200, None)

    async def handle(self, request: web.Request) -> web.Response:
        """The same handler as the receiver itself (``add_post(path, receiver.handle)``)."""
        return await self(request)

    async def _read_body(self, request: web.Request) -> bytes:
        announced = request.content_length
        if announced is not None and announced > self.max_body_size:
            raise _BodyTooLarge
        # Read in chunks so a chunked body (no Content-Length) cannot exceed the limit.
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_READ_CHUNK):
            size += len(chunk)
            if size > self.max_body_size:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    # -- delivery ----------------------------------------------------------------------

    def subscribe(self, task_id: str) -> TaskSubscription:
        """Start collecting the updates of one task.

        If a callback for the task arrived before this call, its latest state is the
        subscription's first update.
        """
        subscription = TaskSubscription(self, task_id)
        self._subscriptions.setdefault(task_id, set()).add(subscription)
        known = self._latest.get(task_id)
        if known is not None:
            subscription._put(known)
        return subscription

    def _unsubscribe(self, subscription: TaskSubscription) -> None:
        subscriptions = self._subscriptions.get(subscription.task_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.task_id]

    def latest(self, task_id: str) -> Task | None:
        """The latest state a callback reported for a task, if one is remembered."""
        return self._latest.get(task_id)

    def _deliver(self, task: Task) -> None:
        self._remember_task(task)
        for subscription in tuple(self._subscriptions.get(task.task_id, ())):
            subscription._put(task)
            if subscription._waiting_span is not None:
                # In the handler's context (the app's server span, if it has one),
                # linked to the wait this callback reports to.
                _telemetry.linked_span(
                    "kling callback",
                    subscription._waiting_span,
                    {"kling.task_id": task.task_id, "kling.task.status": task.status.value},
                )

    def _remember_id(self, message_id: str) -> None:
        self._seen_ids[message_id] = None
        if len(self._seen_ids) > self.remember_ids:
            self._seen_ids.popitem(last=False)

    def _remember_task(self, task: Task) -> None:
        known = self._latest.get(task.task_id)
        if known is not None and not _is_newer(task, known):
            self._latest.move_to_end(task.task_id)
            return
        self._latest[task.task_id] = task
        self._latest.move_to_end(task.task_id)
        if len(self._latest) > self.remember_ids:
            self._latest.popitem(last=False)


def _is_newer(task: Task, known: Task) -> bool:
    # Callbacks can arrive out of order: a finished state is never replaced by an
    # unfinished one, and an older `updated_at` never replaces a newer one.
    if known.is_terminal and not task.is_terminal:
        return False
    if task.updated_at is not None and known.updated_at is not None:
        return task.updated_at >= known.updated_at
    return True


def _answer(
    status: int, error: str | None, *, duplicate: bool = False, close: bool = False
) -> web.Response:
    document: dict[str, Any] = {"ok": error is None}
    if error is not None:
        document["error"] = error
    if duplicate:
        document["duplicate"] = True
    response = web.Response(
        body=orjson.dumps(document), status=status, content_type="application/json"
    )
    if close:
        response.force_close()  # the rest of an unread body must not poison keep-alive
    return response


def _verifier_for(secret: str | None) -> CallbackVerifier:
    if secret is not None:
        return CallbackVerifier(secret)
    from_env = os.environ.get(SECRET_ENV) or None
    try:
        return CallbackVerifier(from_env)
    except ConfigurationError:
        raise ConfigurationError(
            f"{SECRET_ENV} is not a valid webhook secret (expected whsec_ followed by "
            f"base64); fix it, or leave it unset to accept unsigned callbacks"
        ) from None


def _mark_as_handler(receiver: CallbackReceiver) -> None:
    """Let aiohttp see the receiver as the coroutine function its `__call__` is.

    aiohttp accepts a handler only if `inspect.iscoroutinefunction` (or, before 3.14,
    `asyncio.iscoroutinefunction`) says so; anything else is wrapped with a
    DeprecationWarning. Neither looks at an instance's ``async def __call__``, so the
    instance carries the marker each of them reads (the way asgiref marks callables).
    """
    if sys.version_info >= (3, 12):
        inspect.markcoroutinefunction(receiver)
    else:
        receiver._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
