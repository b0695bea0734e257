"""Creating a task exactly once, and waiting for it: the layer under the client and the batch.

A create always carries an ``external_task_id`` (the caller's, or a UUID). After any
failure that may have reached the service, the next try first looks the task up by
that id and POSTs again only when the service answers that no such task exists (404,
code 1203): any other answer to the look-up is an error, never a reason to create again.

With an account (`kling_async._account`), a create first claims a caller-given id (a
second create with the same id returns the first one's task), then takes a running-task
slot; a 1303 answer gives the slot back and waits for another instead of spending a
retry; the slot is freed when anyone sees the task finished.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs
import backoff

from kling_async import _protocol
from kling_async._converter import parse_task, request_body
from kling_async._deadlines import within
from kling_async._hooks import call_back
from kling_async._models import ExtendRequest, PollPolicy, Task, TaskStatus
from kling_async._transport import Transport
from kling_async._types import CallbackSource, OnUpdate
from kling_async.errors import (
    APITimeoutError,
    KlingError,
    TaskFailedError,
    WaitTimeoutError,
)

if TYPE_CHECKING:  # the accounts load only when one is used
    from kling_async._account import Account, AccountSlot

logger = logging.getLogger("kling_async")

#: With callbacks, waits poll this many times less often (a backstop only).
CALLBACK_BACKSTOP_FACTOR: Final = 3.0


def _retry_unless_full(error: BaseException) -> bool:
    # With an account, a 1303 is the account's to handle (wait for a slot), not a retry.
    return _protocol.is_retryable(error) and not _protocol.is_concurrency_limit(error)


class _Create:
    """One create's tries: POST, or, after an ambiguous failure, look up first."""

    __slots__ = ("before_post", "body", "external_id", "maybe_created", "send")

    def __init__(
        self,
        send: Any,
        body: dict[str, Any],
        external_id: str,
        look_up: bool,
        before_post: Callable[[], None] | None,
    ) -> None:
        self.send = send
        self.body = body
        self.external_id = external_id
        self.maybe_created = look_up
        self.before_post = before_post

    async def attempt(self, method: str, path: str) -> Task:
        if self.maybe_created:
            try:
                data, request_id = await self.send("GET", _protocol.task_path(self.external_id))
            except KlingError as error:
                if not _protocol.is_task_absent(error):
                    raise
                self.maybe_created = False
            else:
                logger.info("task with external_task_id %s already exists", self.external_id)
                return self._task(data, request_id)
        if self.before_post is not None:
            self.before_post()
        try:
            data, request_id = await self.send(method, path, self.body)
        except KlingError as error:
            if _protocol.may_have_been_processed(error):
                self.maybe_created = True
            raise
        except asyncio.CancelledError:
            self.maybe_created = True  # the request may be on its way
            raise
        return self._task(data, request_id)

    def _task(self, data: Any, request_id: str | None) -> Task:
        return parse_task(data, request_id=request_id, external_task_id=self.external_id)


class Tasks:
    """Create exactly once, look up, and wait, over a transport and an optional account."""

    def __init__(self, transport: Transport, poll: PollPolicy, account: Account | None) -> None:
        self.transport = transport
        self.poll = poll
        self.account = account

    # -- look ---------------------------------------------------------------------------

    async def get(self, key: str) -> Task:
        """One task by task id or external id (retried); a finished one frees its slot."""
        data, request_id = await self.transport.retrying(
            self.transport.send, "GET", _protocol.task_path(key)
        )
        task = parse_task(data, request_id=request_id)
        if self.account is not None and task.is_terminal:
            await self.account.finished(task)
        return task

    async def lookup(self, external_task_id: str) -> Task | None:
        """The task with this external id, or None when the service says there is none."""
        try:
            return await self.get(external_task_id)
        except KlingError as error:
            if _protocol.is_task_absent(error):
                return None
            raise

    # -- create -------------------------------------------------------------------------

    async def create(
        self,
        request: ExtendRequest,
        *,
        account: Account | None = None,
        look_up_first: bool = False,
        slot_timeout: float | None = None,
        before_post: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> Task:
        """Create the task of `request` exactly once.

        Args:
            request: what to create.
            account: the account's slots to use (default: the client's account, if any).
            look_up_first: look the task up by its external id before the first POST (a
                resumed batch item, whose earlier run may have created it).
            slot_timeout: the longest wait for a running-task slot (None: no limit).
            before_post: called before every POST; raising stops the create unsent.
            on_refused: called on every 1303 answer the account handles.
        """
        body = request_body(request)
        external_id: str = request.external_task_id or uuid.uuid4().hex
        body["external_task_id"] = external_id
        create = _Create(self.transport.send, body, external_id, look_up_first, before_post)
        account = account or self.account
        if account is None:
            return await self.transport.retrying(create.attempt, "POST", _protocol.EXTEND_PATH)
        claimed = request.external_task_id is not None
        if claimed:
            existing = await account.claim(external_id)
            if existing is not None:
                logger.info("external_task_id %s was created by another call", external_id)
                return existing
        task: Task | None = None
        try:
            task = await self._create_in(account, create, slot_timeout, on_refused)
        finally:
            if claimed:
                await account.settle(external_id, task)
        return task

    async def _create_in(
        self,
        account: Account,
        create: _Create,
        slot_timeout: float | None,
        on_refused: Callable[[], None] | None,
    ) -> Task:
        slot: AccountSlot | None = await self._acquire(account, create, slot_timeout)
        try:
            while True:
                try:
                    task = await self.transport.retrying(
                        create.attempt,
                        "POST",
                        _protocol.EXTEND_PATH,
                        retry_if=_retry_unless_full,
                    )
                except KlingError as error:
                    if not _protocol.is_concurrency_limit(error):
                        raise
                    assert slot is not None
                    if on_refused is not None:
                        on_refused()
                    # A 1303 proves this POST created nothing; an earlier ambiguous try
                    # is still remembered in `create.maybe_created` (looked up first).
                    held, slot = slot, None
                    await account.refused(held, getattr(error, "retry_after", None))
                    slot = await self._acquire(account, create, slot_timeout)
                    continue
                assert slot is not None
                held, slot = slot, None
                await account.created(held, task)
                return task
        finally:
            if slot is not None:
                await account.release(slot, maybe_created=create.maybe_created)

    async def _acquire(
        self, account: Account, create: _Create, timeout: float | None
    ) -> AccountSlot:
        try:
            return await within(account.acquire(create.external_id, self.lookup), timeout)
        except asyncio.TimeoutError:
            raise APITimeoutError(
                f"no running-task slot of the account came free within {timeout:g} s",
                method="POST",
                path=_protocol.EXTEND_PATH,
                sent=False,
            ) from None

    async def extend_and_wait(
        self,
        request: ExtendRequest,
        *,
        timeout: float,
        on_update: OnUpdate | None,
        callbacks: CallbackSource | None,
    ) -> Task:
        """Create, then wait; the wait for an account slot counts against `timeout`."""
        if callbacks is not None and request.callback_url is None:
            request = attrs.evolve(request, callback_url=callbacks.url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = await self.create(request, slot_timeout=timeout)
        await call_back(on_update, task)
        return await self.wait(
            task.task_id,
            task,
            timeout=max(0.0, deadline - loop.time()),
            on_update=on_update,
            callbacks=callbacks,
        )

    # -- wait ---------------------------------------------------------------------------

    def intervals(self) -> Iterator[float]:
        """The poll policy's intervals, jittered."""
        policy = self.poll
        growth = backoff.expo(
            base=policy.factor, factor=policy.initial, max_value=policy.max_interval
        )
        next(growth)  # backoff's generators are primed before use
        for interval in growth:
            yield interval * random.uniform(1 - policy.jitter, 1 + policy.jitter)

    async def wait(
        self,
        task_id: str,
        last: Task | None,
        *,
        timeout: float,
        on_update: OnUpdate | None,
        callbacks: CallbackSource | None,
        account: Account | None = None,
    ) -> Task:
        """Poll (and listen to callbacks) until the task ends; see `wait_for_task`.

        The task's slot in `account` (default: the client's) is freed when it ends.
        """
        account = account or self.account
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        intervals = self.intervals()
        seen = last.raw_status if last is not None else None
        delay = next(intervals) if last is not None else 0.0
        subscription = callbacks.subscribe(task_id) if callbacks is not None else None
        try:
            while True:
                if last is not None and last.is_terminal:
                    if account is not None:
                        await account.finished(last)
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
            return await within(self.get(task_id), remaining)
        except asyncio.TimeoutError:
            return None
        except KlingError as error:
            if not _protocol.is_retryable(error):
                raise
            logger.warning("polling task %s failed (%s); will look again", task_id, error)
            return None
