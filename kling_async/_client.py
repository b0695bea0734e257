"""`KlingClient`: the methods of API.md, thin over the create-and-wait layer and the transport."""

from __future__ import annotations

import logging
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from kling_async import _protocol
from kling_async._config import (
    check_count,
    is_int_in,
    is_seconds,
    is_text,
    resolve_auth,
    resolve_base_url,
)
from kling_async._converter import parse_task_list
from kling_async._models import (
    BatchResult,
    ExtendRequest,
    PollPolicy,
    ResourcePack,
    Task,
    Video,
    default_poll,
)
from kling_async._tasks import Tasks
from kling_async._transport import Transport
from kling_async._types import CallbackSource, OnDownloadProgress, OnProgress, OnUpdate
from kling_async.errors import ConfigurationError, ResponseFormatError, ValidationError

if TYPE_CHECKING:
    from datetime import datetime

    from typing_extensions import Self

    from kling_async._account import Account
    from kling_async._costs import Costs

logger = logging.getLogger("kling_async")

MAX_PAGE_SIZE: Final = 500
#: Kling's last page number (API.md: pageNum 1..1000): `iter_tasks` stops there.
MAX_PAGE: Final = 1000


def _is_account(value: object) -> bool:
    # Imported here: the accounts load only when one is used.
    from kling_async._account import Account

    return isinstance(value, Account)


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
        account: where the account's running-task slots are kept (an `InMemoryAccount`
            for one process, a `kling_async.redis.RedisAccount` for many); every create
            takes a slot first. The client never closes it.

    A client belongs to the event loop it first ran in; used from another it raises
    `RuntimeError`.

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
        account: Account | None = None,
    ) -> None:
        auth = resolve_auth(api_key, access_key, secret_key)
        self.base_url = resolve_base_url(base_url, allow_insecure)
        if not is_seconds(timeout) or not timeout:
            raise ConfigurationError("timeout must be a number of seconds above 0")
        if poll is not None and not isinstance(poll, PollPolicy):
            raise ConfigurationError("poll must be a PollPolicy")
        if account is not None and not _is_account(account):
            raise ConfigurationError(
                "account must be an InMemoryAccount, a kling_async.redis.RedisAccount or "
                "another kling_async Account"
            )
        self.poll = poll or default_poll()
        #: Where the account's running-task slots are kept (None: not tracked).
        self.account = account
        self._auth_kind = auth.kind
        self._transport = Transport(
            base_url=self.base_url,
            auth=auth,
            max_in_flight=check_count("max_in_flight", max_in_flight, 1),
            max_retries=check_count("max_retries", max_retries, 0),
            timeout=float(timeout),
            session=session,
        )
        self._tasks = Tasks(self._transport, self.poll, account)
        self._costs: Costs | None = None

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
        """Close the client's own HTTP session (not one you passed in). Safe to repeat.

        An account passed in is not closed: it may be shared with other clients.
        """
        await self._transport.aclose()

    # -- create ------------------------------------------------------------------------

    async def extend(self, request: ExtendRequest) -> Task:
        """Create one extension task.

        The client sets `external_task_id` (a UUID) when the request has none, and after
        a failure that may have reached the service (timeout, dropped connection, 5xx, a
        garbled answer) it looks the task up by that id before it submits again, so a
        retry never creates (and bills) a second task. A caller-given `external_task_id`
        may have been used before (a job run again): it is looked up before the first
        POST, and while one create of it runs in this process a second one waits for it
        and returns its task. See the Guarantees page.

        With an `account`, it first takes a running-task slot, waiting while none is
        free (1303 answers included) for at most the client's `timeout`.

        Returns:
            The new task, carrying the `external_task_id` that was sent.

        Raises:
            RateLimitError: the account stayed full (1303) for the whole `timeout`.
        """
        if not isinstance(request, ExtendRequest):
            raise ValidationError("request", "must be an ExtendRequest", request)
        return await self._tasks.create(request, slot_timeout=self._tasks.transport.seconds)

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
        if not is_text(key):
            raise ValidationError(name, "must be a non-empty string", key)
        assert isinstance(key, str)
        return await self._tasks.get(key)

    async def list_tasks(self, page: int = 1, page_size: int = 30) -> list[Task]:
        """One page of your tasks, newest first (`page` 1 to 1000, `page_size` 1 to 500).

        Raises:
            ResponseFormatError: the page holds more tasks than `page_size` (a server
                that ignores ``pageSize``); the message names the page.
        """
        if not is_int_in(page, 1, MAX_PAGE):
            raise ValidationError("page", f"must be an integer from 1 to {MAX_PAGE}", page)
        if not is_int_in(page_size, 1, MAX_PAGE_SIZE):
            raise ValidationError(
                "page_size", f"must be an integer from 1 to {MAX_PAGE_SIZE}", page_size
            )
        data, request_id = await self._transport.retrying(
            self._transport.send, "GET", _protocol.list_path(page, page_size)
        )
        tasks = parse_task_list(data, request_id=request_id)
        if len(tasks) > page_size:
            raise ResponseFormatError(
                f"page {page} holds {len(tasks)} tasks, more than the {page_size} asked for "
                "(does the server ignore pageSize?)",
                path="data",
            )
        return tasks

    async def iter_tasks(self, page_size: int = 100) -> AsyncIterator[Task]:
        """Every task, page by page, fetching the next page only when it is reached.

        It ends at the first page shorter than `page_size`, at Kling's last page (1000),
        or when a page repeats the one before (a server that ignores ``pageNum``; logged
        as a warning): it always ends, whatever the server answers.
        """
        previous: list[str] | None = None
        for page in range(1, MAX_PAGE + 1):
            tasks = await self.list_tasks(page, page_size)
            ids = [task.task_id for task in tasks]
            if ids == previous:
                logger.warning(
                    "page %d of the task list repeats page %d: the server ignores pageNum; "
                    "stopping there",
                    page,
                    page - 1,
                )
                return
            for task in tasks:
                yield task
            if len(tasks) < page_size:
                return
            previous = ids

    async def resource_packs(
        self, *, since: datetime | None = None, name: str | None = None
    ) -> list[ResourcePack]:
        """The account's resource packs (``GET /account/costs``, official API only).

        Kling finds packs by when they were bought, so `since` (default: 400 days ago)
        must reach back to the purchase of the oldest pack you want to see; `name` keeps
        only the packs of that name. Kling answers one such query a second: calls from
        one client are spaced a second apart. The remainder it reports may lag the
        tasks it bills by up to 12 hours.

        Raises:
            NotFoundError: the base URL does not offer the endpoint (most gateways).
        """
        if self._costs is None:
            from kling_async._costs import Costs

            self._costs = Costs(self._transport)
        return await self._costs.resource_packs(since=since, name=name)

    # -- wait --------------------------------------------------------------------------

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
        return await self._tasks.wait(
            task_id, last, timeout=timeout, on_update=on_update, callbacks=callbacks
        )

    async def extend_and_wait(
        self,
        request: ExtendRequest,
        *,
        timeout: float = 900.0,
        on_update: OnUpdate | None = None,
        callbacks: CallbackSource | None = None,
    ) -> Task:
        """`extend`, then `wait_for_task` (with the receiver's URL as `callback_url`).

        With an account, the wait for a running-task slot counts against `timeout` too.
        """
        if not isinstance(request, ExtendRequest):
            raise ValidationError("request", "must be an ExtendRequest", request)
        if not is_seconds(timeout):
            raise ValidationError("timeout", "must be a number of seconds, 0 or more", timeout)
        return await self._tasks.extend_and_wait(
            request, timeout=timeout, on_update=on_update, callbacks=callbacks
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

        return await extend_chain(
            self._tasks, video_id, prompts, parent_task_id=parent_task_id, **options
        )

    def extend_many(
        self,
        requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
        *,
        concurrency: int | None = None,
        wait: bool = True,
        journal: str | os.PathLike[str] | None = None,
        on_progress: OnProgress | None = None,
        callbacks: CallbackSource | None = None,
        on_update: Callable[[int, Task], object] | None = None,
    ) -> AsyncGenerator[BatchResult, None]:
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
            on_update: called (synchronously) as ``on_update(index, task)`` on every
                status change of an item's task.
        """
        from kling_async._batch import extend_many

        return extend_many(
            self._tasks,
            requests,
            concurrency=self.max_in_flight if concurrency is None else concurrency,
            wait=wait,
            journal=os.fspath(journal) if journal is not None else None,
            on_progress=on_progress,
            callbacks=callbacks,
            on_update=on_update,
        )

    async def download(
        self,
        task_or_video: Task | Video,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        on_progress: OnDownloadProgress | None = None,
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
            ResponseFormatError: the server kept answering with something that is not a
                video (a proxy's HTML page, say), after retries; no file is touched.
            NotFoundError: the result is gone (Kling deletes results after 30 days).
        """
        from kling_async._download import download

        return await download(
            self._transport, task_or_video, dest, overwrite=overwrite, on_progress=on_progress
        )
