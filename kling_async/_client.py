"""`KlingClient`: the methods of API.md, composed from the transport, protocol and models."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import urllib.parse
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
import attrs
import backoff

from kling_async import _protocol
from kling_async._auth import Auth, BearerAuth, JWTAuth
from kling_async._checks import is_int_in, is_seconds, is_text
from kling_async._converter import parse_task, parse_task_list
from kling_async._deadlines import within
from kling_async._hooks import call_back
from kling_async._models import BatchResult, ExtendRequest, PollPolicy, Task, TaskStatus, Video
from kling_async._protocol import EXTEND_PATH, Envelope
from kling_async._transport import Transport
from kling_async.errors import (
    ConfigurationError,
    KlingError,
    NotFoundError,
    TaskFailedError,
    ValidationError,
    WaitTimeoutError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

    from kling_async._batch import BatchProgress

logger = logging.getLogger("kling_async")

DEFAULT_BASE_URL: Final = "https://api-singapore.klingai.com"
MAX_PAGE_SIZE: Final = 500
#: With callbacks, `wait_for_task` polls this many times less often (a backstop only).
CALLBACK_BACKSTOP_FACTOR: Final = 3.0

#: A callable told about every status change: sync or async.
OnUpdate = Callable[[Task], "Awaitable[None] | None"]


class CallbackSource(Protocol):
    """What `wait_for_task(callbacks=...)` needs from a callback receiver."""

    @property
    def url(self) -> str:
        """The public URL Kling should POST task updates to."""

    def subscribe(self, task_id: str) -> CallbackSubscription:
        """Start collecting callbacks for one task."""


class CallbackSubscription(Protocol):
    async def next(self, timeout: float) -> Task | None:
        """The next task update that arrives within `timeout` seconds, else None."""

    def close(self) -> None:
        """Stop collecting."""


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _resolve_auth(api_key: str | None, access_key: str | None, secret_key: str | None) -> Auth:
    if api_key is None and access_key is None and secret_key is None:
        api_key = _env("KLING_API_KEY")
        access_key = _env("KLING_ACCESS_KEY")
        secret_key = _env("KLING_SECRET_KEY")
    for name, value in (
        ("api_key", api_key),
        ("access_key", access_key),
        ("secret_key", secret_key),
    ):
        if value is not None and not is_text(value):
            raise ConfigurationError(f"{name} must be a non-empty string")
    if api_key is not None:
        return BearerAuth(api_key)
    if access_key is not None and secret_key is not None:
        return JWTAuth(access_key, secret_key)
    if access_key is not None or secret_key is not None:
        missing = "secret_key (KLING_SECRET_KEY)" if secret_key is None else "access_key"
        raise ConfigurationError(
            f"access_key and secret_key go together: {missing} is missing"
            + (" (KLING_ACCESS_KEY)" if secret_key is not None else "")
        )
    raise ConfigurationError(
        "no credentials: pass api_key= (a gateway's key) or access_key= and secret_key= "
        "(official API), or set KLING_API_KEY, or KLING_ACCESS_KEY and KLING_SECRET_KEY"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(base_url: str, allow_insecure: bool) -> str:
    try:
        parts = urllib.parse.urlsplit(base_url)
        host = parts.hostname
    except ValueError:
        raise ConfigurationError("base_url (KLING_BASE_URL) is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError("base_url (KLING_BASE_URL) must be an absolute http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigurationError(
            "base_url (KLING_BASE_URL) must not carry credentials, a query or a fragment"
        )
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(host):
        raise ConfigurationError(
            f"base_url uses plain http:// to {host}, which would send credentials in clear "
            "text; use https://, or pass allow_insecure=True if you really mean it"
        )
    return base_url.rstrip("/")


def _check_count(name: str, value: object, minimum: int) -> int:
    if not is_int_in(value, minimum, None):
        raise ConfigurationError(f"{name} must be an integer of at least {minimum}")
    assert isinstance(value, int)
    return value


class KlingClient:
    """An async client for Kling's video-extend API.

    Use it as ``async with KlingClient() as kling: ...`` or close it with
    `aclose()`. Arguments left out are read from ``KLING_API_KEY``,
    ``KLING_ACCESS_KEY``/``KLING_SECRET_KEY`` and ``KLING_BASE_URL``. When both a key
    and an access/secret pair are given, the key (bearer) is used.

    Args:
        api_key: a gateway's bearer key.
        access_key: the official API's access key (signed into a JWT with `secret_key`).
        secret_key: the official API's secret key.
        base_url: the API root, with a gateway's ``/kling`` prefix if it has one.
        max_in_flight: the most HTTP requests open at once, retries and polls included.
        max_retries: retries after the first attempt of a failed request.
        timeout: seconds for one HTTP request (total and between reads).
        session: an `aiohttp.ClientSession` to use; the client never closes it.
        poll: how `wait_for_task` spaces its looks.
        allow_insecure: allow plain ``http://`` to a host that is not loopback.

    Raises:
        ConfigurationError: no credentials, or an unusable setting (named in the message).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
        max_in_flight: int = 8,
        max_retries: int = 4,
        timeout: float = 60.0,
        session: aiohttp.ClientSession | None = None,
        poll: PollPolicy | None = None,
        allow_insecure: bool = False,
    ) -> None:
        auth = _resolve_auth(api_key, access_key, secret_key)
        url = base_url if base_url is not None else (_env("KLING_BASE_URL") or DEFAULT_BASE_URL)
        self.base_url = _check_base_url(url, allow_insecure)
        if not is_seconds(timeout) or not timeout:
            raise ConfigurationError("timeout must be a number of seconds above 0")
        if poll is not None and not isinstance(poll, PollPolicy):
            raise ConfigurationError("poll must be a PollPolicy")
        self.poll = poll or PollPolicy()
        self._auth_kind = auth.kind
        self._transport = Transport(
            base_url=self.base_url,
            auth=auth,
            max_in_flight=_check_count("max_in_flight", max_in_flight, 1),
            max_retries=_check_count("max_retries", max_retries, 0),
            timeout=float(timeout),
            session=session,
        )

    def __repr__(self) -> str:
        state = "closed" if self._transport.closed else "open"
        return f"<KlingClient {self.base_url} auth={self._auth_kind} {state}>"

    @property
    def max_in_flight(self) -> int:
        """The most HTTP requests this client has open at once."""
        return self._transport.max_in_flight

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._transport.session()  # fail early if closed; born inside the running loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's own HTTP session (not one you passed in). Safe to repeat."""
        await self._transport.aclose()

    # -- create ------------------------------------------------------------------------

    async def extend(self, request: ExtendRequest) -> Task:
        """Create one extension task.

        The client sets `external_task_id` (a UUID) when the request has none, and after
        a failure that may have reached the service (timeout, dropped connection, 5xx, a
        garbled answer) it looks the task up by that id before it submits again, so a
        retry never creates (and bills) a second task.

        Returns:
            The new task, carrying the `external_task_id` that was sent.
        """
        return await self.create(request)

    async def create(
        self,
        request: ExtendRequest,
        *,
        retry_if: Callable[[BaseException], bool] = _protocol.is_retryable,
        look_up_first: bool = False,
    ) -> Task:
        """`extend` with the knobs the batch runner needs (not part of the public API).

        `retry_if` decides which failures are retried here; `look_up_first` looks the
        task up by its external id before the first POST (a resumed batch item).
        """
        if not isinstance(request, ExtendRequest):
            raise ValidationError("request", "must be an ExtendRequest", request)
        body = request.to_body()
        # Our own id for the task, so that after an ambiguous failure we can ask whether
        # it exists instead of creating (and paying for) a second one.
        external_id: str = request.external_task_id or uuid.uuid4().hex
        body["external_task_id"] = external_id
        transport = self._transport
        maybe_created = look_up_first

        def finish(envelope: Envelope) -> Task:
            return parse_task(
                envelope.data, request_id=envelope.request_id, external_task_id=external_id
            )

        async def attempt() -> Task:
            nonlocal maybe_created
            if maybe_created:
                try:
                    found = await transport.send("GET", _protocol.task_path(external_id))
                except NotFoundError:
                    maybe_created = False
                else:
                    logger.info("task with external_task_id %s already exists", external_id)
                    return finish(found)
            try:
                return finish(await transport.send("POST", EXTEND_PATH, body=body))
            except KlingError as error:
                if _protocol.may_have_been_processed(error):
                    maybe_created = True
                raise

        return await transport.retrying(attempt, name=f"POST {EXTEND_PATH}", retry_if=retry_if)

    async def extend_video(
        self,
        video_id: str,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        cfg_scale: float | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
        watermark: bool | None = None,
        parent_task_id: str | None = None,
    ) -> Task:
        """Build an `ExtendRequest` from the arguments and `extend` it."""
        return await self.extend(
            ExtendRequest(
                video_id=video_id,
                prompt=prompt,
                negative_prompt=negative_prompt,
                cfg_scale=cfg_scale,
                callback_url=callback_url,
                external_task_id=external_task_id,
                watermark=watermark,
                parent_task_id=parent_task_id,
            )
        )

    # -- read --------------------------------------------------------------------------

    async def get_task(
        self, task_id: str | None = None, *, external_task_id: str | None = None
    ) -> Task:
        """One task, by its `task_id` or by your `external_task_id` (exactly one)."""
        if (task_id is None) == (external_task_id is None):
            raise ValidationError("task_id", "give exactly one of task_id and external_task_id")
        name = "task_id" if task_id is not None else "external_task_id"
        key = task_id if task_id is not None else external_task_id
        if not isinstance(key, str) or not is_text(key):
            raise ValidationError(name, "must be a non-empty string", key)
        envelope = await self._transport.request("GET", _protocol.task_path(key))
        return parse_task(envelope.data, request_id=envelope.request_id)

    async def list_tasks(self, page: int = 1, page_size: int = 30) -> list[Task]:
        """One page of your tasks, newest first (`page` from 1, `page_size` 1 to 500)."""
        if not is_int_in(page, 1, None):
            raise ValidationError("page", "must be an integer of at least 1", page)
        if not is_int_in(page_size, 1, MAX_PAGE_SIZE):
            raise ValidationError(
                "page_size", f"must be an integer from 1 to {MAX_PAGE_SIZE}", page_size
            )
        envelope = await self._transport.request(
            "GET", EXTEND_PATH, query=_protocol.list_query(page, page_size)
        )
        return parse_task_list(envelope.data, request_id=envelope.request_id)

    async def iter_tasks(self, page_size: int = 100) -> AsyncIterator[Task]:
        """Every task, page by page, fetching the next page only when it is reached."""
        page = 1
        while True:
            tasks = await self.list_tasks(page, page_size)
            for task in tasks:
                yield task
            if len(tasks) < page_size:
                return
            page += 1

    # -- wait --------------------------------------------------------------------------

    def _intervals(self) -> Iterator[float]:
        policy = self.poll
        growth = backoff.expo(
            base=policy.factor, factor=policy.initial, max_value=policy.max_interval
        )
        next(growth)  # backoff's generators are primed before use
        for interval in growth:
            yield interval * random.uniform(1 - policy.jitter, 1 + policy.jitter)

    async def wait_for_task(
        self,
        task_or_id: Task | str,
        *,
        timeout: float = 900.0,
        on_update: OnUpdate | None = None,
        callbacks: CallbackSource | None = None,
    ) -> Task:
        """Wait until a task succeeds or fails, and return it.

        Given a `Task`, the first look comes after `PollPolicy.initial`; given a task
        id, at once. Failed polls that are worth retrying never end the wait. With
        `callbacks`, a callback for the task ends the wait as soon as it arrives; polls
        go on, three times less often, as a backstop in case a callback is lost.

        Args:
            task_or_id: the task, or its `task_id`.
            timeout: seconds to wait in all.
            on_update: called (sync or async) with the task on every status change.
            callbacks: a `CallbackReceiver` the task reports to.

        Raises:
            TaskFailedError: the task failed (`.task` says why).
            WaitTimeoutError: `timeout` passed first (`.task` is the last state seen).
        """
        if isinstance(task_or_id, Task):
            last: Task | None = task_or_id
            task_id = task_or_id.task_id
        elif is_text(task_or_id):
            last, task_id = None, task_or_id
        else:
            raise ValidationError("task_or_id", "must be a Task or a task id", task_or_id)
        if not is_seconds(timeout):
            raise ValidationError("timeout", "must be a number of seconds, 0 or more", timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        intervals = self._intervals()
        seen = last.raw_status if last is not None else None
        delay = next(intervals) if last is not None else 0.0
        subscription = callbacks.subscribe(task_id) if callbacks is not None else None
        try:
            while True:
                if last is not None and last.is_terminal:
                    if last.failed:
                        raise TaskFailedError(last)
                    return last
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitTimeoutError(
                        last or Task(task_id=task_id, status=TaskStatus.UNKNOWN), timeout
                    )
                update = None
                if subscription is not None:
                    # Callbacks carry the news; polls are only the backstop, so slower.
                    backstop = delay * CALLBACK_BACKSTOP_FACTOR
                    update = await subscription.next(min(backstop, remaining))
                elif delay > 0:
                    await asyncio.sleep(min(delay, remaining))
                if update is None and loop.time() < deadline:
                    update = await self._poll_once(task_id, deadline - loop.time())
                if update is not None:
                    if update.raw_status != seen:
                        seen = update.raw_status
                        await call_back(on_update, update)
                    last = update
                delay = next(intervals)
        finally:
            if subscription is not None:
                subscription.close()

    async def _poll_once(self, task_id: str, remaining: float) -> Task | None:
        try:
            return await within(self.get_task(task_id), remaining)
        except asyncio.TimeoutError:
            return None
        except KlingError as error:
            if not _protocol.is_retryable(error):
                raise
            logger.warning("polling task %s failed (%s); will look again", task_id, error)
            return None

    async def extend_and_wait(
        self,
        request: ExtendRequest,
        *,
        timeout: float = 900.0,
        on_update: OnUpdate | None = None,
        callbacks: CallbackSource | None = None,
    ) -> Task:
        """`extend`, then `wait_for_task` (with the receiver's URL as `callback_url`)."""
        if callbacks is not None and request.callback_url is None:
            request = attrs.evolve(request, callback_url=callbacks.url)
        task = await self.extend(request)
        await call_back(on_update, task)
        return await self.wait_for_task(
            task, timeout=timeout, on_update=on_update, callbacks=callbacks
        )

    # -- on top ------------------------------------------------------------------------

    async def extend_chain(
        self,
        video_id: str | Video,
        prompts: Sequence[str],
        *,
        parent_task_id: str | None = None,
        **options: Any,
    ) -> list[Task]:
        """Extend a video once per prompt, each step from the previous step's result.

        Each step waits for its task and extends the video it made (passing that task
        as `parent_task_id`, for gateways that want it). Kling extends videos only up to
        3 minutes and each step adds up to 5 s, so a chain that could pass 180 s is
        refused with `ValidationError` before the step that could: before any request
        when you pass a `Video` (whose duration is known), and otherwise from the first
        result's reported duration on.

        Args:
            video_id: the video to start from (a `Video` lets the length be checked now).
            prompts: one prompt per step.
            parent_task_id: the task that made `video_id`, if your gateway needs it.
            **options: `negative_prompt`, `cfg_scale`, `callback_url`, `watermark` for
                every step.

        Returns:
            Every step's finished task, in order.

        Raises:
            TaskFailedError: a step failed; `.steps` holds the steps done before it.
        """
        from kling_async._chain import extend_chain

        return await extend_chain(self, video_id, prompts, parent_task_id=parent_task_id, **options)

    def extend_many(
        self,
        requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
        *,
        concurrency: int | None = None,
        wait: bool = True,
        journal: str | os.PathLike[str] | None = None,
        on_progress: Callable[[BatchProgress], Awaitable[None] | None] | None = None,
        callbacks: CallbackSource | None = None,
    ) -> AsyncIterator[BatchResult]:
        """Run many extensions, yielding one `BatchResult` per input as each finishes.

        The input (any iterable or async iterable) is read lazily. At most
        `concurrency` items (default `max_in_flight`) run at once; fewer while the
        account answers 1303 (too many running tasks), growing back as creates succeed.
        A failed item is a result with `error` set, never an exception; after a
        no-credit answer (1100-1102) every item not yet submitted comes back with that
        error, unsent. Leaving the ``async for`` cancels the items in flight.

        Args:
            requests: the extensions to make.
            concurrency: the most items in flight at once.
            wait: True to finish an item when its task ends; False when it is created.
            journal: an SQLite file recording every item, so a rerun of the same input
                resumes: finished items come from the file, submitted ones are polled,
                only the rest are submitted.
            on_progress: called (sync or async) with a `BatchProgress` as items move.
            callbacks: a `CallbackReceiver`: its URL becomes each item's `callback_url`
                and a callback ends a wait early.
        """
        from kling_async._batch import extend_many

        return extend_many(
            self,
            requests,
            concurrency=concurrency,
            wait=wait,
            journal=os.fspath(journal) if journal is not None else None,
            on_progress=on_progress,
            callbacks=callbacks,
        )

    async def download(
        self,
        task_or_video: Task | Video,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        on_progress: Callable[[int, int | None], Awaitable[None] | None] | None = None,
    ) -> Path:
        """Save a result video to `dest` (a directory gets ``<video id>.mp4``).

        The file is streamed to a temporary file beside its destination and renamed into
        place only when complete (its length checked against ``Content-Length``), so
        no half-written file is ever left. Result URLs live on a CDN: no credentials are
        sent with the download. Transient failures are retried, resuming with ``Range``
        where the server allows it.

        Raises:
            FileExistsError: the file exists and `overwrite` is False.
            ValidationError: a task with no result video, or an unusable `dest`.
        """
        from kling_async._download import download

        return await download(
            self._transport, task_or_video, dest, overwrite=overwrite, on_progress=on_progress
        )
