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
import collections
import contextlib
import logging
import random
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, overload

import attrs
import backoff

from kling_async import _protocol, _telemetry
from kling_async._converter import parse_task, request_body
from kling_async._deadlines import IO_TIMEOUT, within
from kling_async._hooks import call_back
from kling_async._models import ExtendRequest, PollPolicy, Task, TaskStatus
from kling_async._transport import Transport
from kling_async._types import CallbackSource, OnUpdate
from kling_async.errors import (
    APITimeoutError,
    KlingError,
    ResponseFormatError,
    TaskFailedError,
    WaitTimeoutError,
)

if TYPE_CHECKING:  # the accounts load only when one is used
    from kling_async._account import Account, AccountSlot


def _retrieve(future: asyncio.Future[Task]) -> None:
    # Nobody may be waiting for a create's outcome: it is not an unretrieved error.
    if not future.cancelled():
        future.exception()


logger = logging.getLogger("kling_async")

#: With callbacks, waits poll this many times less often (a backstop only).
CALLBACK_BACKSTOP_FACTOR: Final = 3.0


#: What one create knows of its external id: nothing was sent that the service may have
#: acted on (a POST may go out) ...
_FRESH: Final = 0
#: ... a request may have reached the service without its outcome being known (look the
#: id up first; "no such task" proves absence only `absence_settle` after the failure) ...
_MAYBE: Final = 1
#: ... the service acted on a create (2xx, code 0) but its answer held no usable task, or
#: refused the id as taken: the task exists, only look-ups are sent from now on.
_CREATED: Final = 2

#: External ids (per service) whose create ended without a task after a request that the
#: service may still act on, with the monotonic time from which "no such task" is proof.
#: Process-wide and kept across calls and clients: a job queue that runs a failed job
#: again in this process gets the look-up and the settle time it needs.
_SUSPECT: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
_SUSPECT_MEMORY: Final = 10_000
#: Creates in flight per event loop, by (service, external id): a second create of the
#: same id waits for the first and shares its outcome.
_FLIGHTS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Future[Task]]
] = weakref.WeakKeyDictionary()


def _suspect(key: tuple[str, str], trust_at: float) -> None:
    _SUSPECT[key] = max(trust_at, _SUSPECT.pop(key, trust_at))
    while len(_SUSPECT) > _SUSPECT_MEMORY:
        _SUSPECT.popitem(last=False)


class _Create:
    """One create's state machine (fresh, maybe created, created) and its tries."""

    __slots__ = ("body", "external_id", "not_before", "send", "state", "trust_at")

    def __init__(self, send: Any, body: dict[str, Any], external_id: str) -> None:
        self.send = send
        self.body = body
        self.external_id = external_id
        self.state = _FRESH
        #: `time.monotonic()` from which a "no such task" answer proves absence.
        self.trust_at = 0.0
        #: `time.monotonic()` before which no POST goes out (the service asked to wait).
        self.not_before: float | None = None

    @property
    def maybe_created(self) -> bool:
        """Whether a request may have created the task without our knowing it: one of
        ours failed ambiguously, the service accepted one, or an earlier create of the
        id left that news (a look-up of an id nothing is known against is not news)."""
        return self.state == _CREATED or (self.state == _MAYBE and self.trust_at > 0)

    def suspect(self, trust_at: float = 0.0) -> None:
        """The id may have been used: look it up before any POST; trust "absent" from
        `trust_at` on (0: at once, as for an id nothing is known against)."""
        if self.state == _FRESH:
            self.state = _MAYBE
        self.trust_at = max(self.trust_at, trust_at)

    def _ambiguous(self) -> None:
        self.suspect(time.monotonic() + _protocol.absence_settle())

    async def attempt(self, method: str, path: str) -> Task:
        while self.state != _FRESH:
            task = await self._look_up()
            if task is not None:
                return task
            if self.state == _CREATED:
                raise self._not_visible_yet()
            wait = self.trust_at - time.monotonic()
            if wait <= 0:
                self.state = _FRESH
                break
            # A request we gave up on may still be queued at a gateway: look again once
            # it can no longer arrive, and only then believe "no such task".
            logger.info(
                "no task with external_task_id %s yet; looking again in %.1f s before submitting",
                self.external_id,
                wait,
            )
            await asyncio.sleep(wait)
        if self.not_before is not None:
            # The service's wait (`_protocol.decide`) holds between POSTs of one create
            # even when the account, not the retry runner, decided to try again.
            await asyncio.sleep(self.not_before - time.monotonic())
        try:
            data, request_id = await self.send(method, path, self.body)
        except KlingError as error:
            if _protocol.may_have_been_processed(error):
                self._ambiguous()
            elif _protocol.is_duplicate_refusal(error):
                logger.info("external_task_id %s is taken: looking its task up", self.external_id)
                self.state = _CREATED
                task = await self._look_up()
                if task is not None:
                    return task
            else:
                decision = _protocol.decide(error)
                if decision.wait is not None:
                    self.not_before = time.monotonic() + decision.wait
                if _telemetry.AVAILABLE and decision.action is _protocol.Action.WAIT_FOR_SLOT:
                    _telemetry.create_refused()
            raise
        except asyncio.CancelledError:
            self._ambiguous()  # the request may be on its way
            raise
        try:
            return self._task(data, request_id)
        except ResponseFormatError:
            # A 2xx with code 0: the service made the task. Never POST again; find it.
            logger.warning(
                "the service accepted the create of %s but its answer held no usable "
                "task; looking it up",
                self.external_id,
            )
            self.state = _CREATED
        task = await self._look_up()
        if task is None:
            raise self._not_visible_yet()
        return task

    async def _look_up(self) -> Task | None:
        try:
            data, request_id = await self.send("GET", _protocol.task_path(self.external_id))
        except KlingError as error:
            if _protocol.is_task_absent(error):
                return None
            raise
        logger.info("task with external_task_id %s already exists", self.external_id)
        return self._task(data, request_id)

    def _not_visible_yet(self) -> ResponseFormatError:
        # Transient (no field path): the runner looks again, and never POSTs again.
        return ResponseFormatError(
            "the service accepted the create, but its answer held no task and a "
            f"look-up by external_task_id {self.external_id} finds none yet"
        )

    def _task(self, data: Any, request_id: str | None) -> Task:
        return parse_task(data, request_id=request_id, external_task_id=self.external_id)


class _Unchanged:
    """A wait's poll condition for `Tasks.get`: a status that is not an end, and the last
    answer that still said it, kept unparsed (only a wait that times out reads it)."""

    __slots__ = ("answer", "status")

    def __init__(self, status: str) -> None:
        self.status = status
        self.answer: tuple[Any, str | None] | None = None

    def last_seen(self, before: Task) -> Task:
        """The task as the last such answer showed it (`before`, the task as it was when
        it took this status, if none came or it does not parse)."""
        if self.answer is None:
            return before
        try:
            return parse_task(self.answer[0], request_id=self.answer[1])
        except ResponseFormatError:
            return before


class Tasks:
    """Create exactly once, look up, and wait, over a transport and an optional account."""

    def __init__(self, transport: Transport, poll: PollPolicy, account: Account | None) -> None:
        self.transport = transport
        self.poll = poll
        self.account = account

    # -- look ---------------------------------------------------------------------------

    @overload
    async def get(self, key: str) -> Task: ...
    @overload
    async def get(self, key: str, unless: _Unchanged | None) -> Task | None: ...
    async def get(self, key: str, unless: _Unchanged | None = None) -> Task | None:
        """One task by task id or external id (retried); a finished one frees its slot.

        With `unless`: None while the task is still in its status (the answer is kept in
        it). A wait's polls before the end need nothing but the status, so the rest of
        such an answer is not parsed.
        """
        data, request_id = await self.transport.retrying(
            self.transport.send, "GET", _protocol.task_path(key)
        )
        if unless is not None and type(data) is dict and data.get("task_status") == unless.status:
            unless.answer = (data, request_id)
            return None
        task = parse_task(data, request_id=request_id)
        if task.is_terminal:
            if _telemetry.AVAILABLE:
                _telemetry.task_finished(task)
            if self.account is not None:
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
        look_up_first: bool | None = None,
        slot_timeout: float | None = None,
    ) -> Task:
        """`create_once`, reported as a ``kling extend`` span when telemetry records."""
        report = _telemetry.operation("kling extend", {}) if _telemetry.AVAILABLE else None
        if report is None:
            return await self.create_once(
                request, look_up_first=look_up_first, slot_timeout=slot_timeout
            )
        with report:
            task = await self.create_once(
                request, look_up_first=look_up_first, slot_timeout=slot_timeout
            )
            report.task(task)
        _telemetry.note_created(report)
        _telemetry.task_created(task)
        return task

    async def create_once(
        self,
        request: ExtendRequest,
        *,
        look_up_first: bool | None = None,
        slot_timeout: float | None = None,
    ) -> Task:
        """Create the task of `request` exactly once.

        In this process, one create per external id runs at a time: a second one waits
        for the first and shares its outcome (the task, or the error).

        Args:
            request: what to create.
            look_up_first: look the task up by its external id before the first POST.
                Default: when the request carries its own id (it may have been used);
                False only for an id nobody can have used (a fresh journal's): only
                the caller that made the id knows that.
            slot_timeout: the longest wait for a running-task slot, 1303 answers
                included (None: no limit); past it a create refused with 1303 raises
                that `RateLimitError` (`extend`'s own timeout).
        """
        body = request_body(request)
        given = request.external_task_id is not None
        external_id: str = request.external_task_id or uuid.uuid4().hex
        body["external_task_id"] = external_id
        if _telemetry.AVAILABLE:
            _telemetry.set_current("kling.external_task_id", external_id)
        key = (self.transport.base_url, external_id)
        create = _Create(self.transport.send, body, external_id)
        if look_up_first if look_up_first is not None else given:
            create.suspect()
        if not given:
            return await self._create(key, create, False, slot_timeout)
        loop = asyncio.get_running_loop()
        flights = _FLIGHTS.setdefault(loop, {})
        while (running := flights.get(key)) is not None:
            logger.info("external_task_id %s is being created: waiting for it", external_id)
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # we were cancelled, not the create we waited for
        future: asyncio.Future[Task] = loop.create_future()
        future.add_done_callback(_retrieve)
        flights[key] = future
        try:
            task = await self._create(key, create, True, slot_timeout)
        except asyncio.CancelledError:
            future.cancel()  # whoever waits tries for itself
            raise
        except BaseException as error:
            future.set_exception(error)
            raise
        else:
            future.set_result(task)
            return task
        finally:
            del flights[key]

    async def _create(
        self,
        key: tuple[str, str],
        create: _Create,
        given: bool,
        slot_timeout: float | None,
    ) -> Task:
        trust_at = _SUSPECT.get(key)
        if trust_at is not None:
            create.suspect(trust_at)
        account = self.account
        token = IO_TIMEOUT.set(self.transport.seconds)
        task: Task | None = None
        try:
            if account is None:
                task = await self.transport.retrying(create.attempt, "POST", _protocol.EXTEND_PATH)
                return task
            if given:
                claim = await account.claim(create.external_id)
                if claim.task is not None:
                    logger.info(
                        "external_task_id %s was created by another call", create.external_id
                    )
                    task = claim.task
                    return task
                if claim.maybe_since is not None:
                    create.suspect(
                        time.monotonic() - claim.maybe_since + _protocol.absence_settle()
                    )
            try:
                task = await self._create_in(account, create, slot_timeout)
            finally:
                if given:
                    await account.settle(
                        create.external_id,
                        task,
                        maybe_created=task is None and create.maybe_created,
                    )
            return task
        finally:
            IO_TIMEOUT.reset(token)
            if task is not None:
                _SUSPECT.pop(key, None)
            elif create.maybe_created:
                _suspect(key, create.trust_at)

    async def _create_in(
        self,
        account: Account,
        create: _Create,
        slot_timeout: float | None,
    ) -> Task:
        loop = asyncio.get_running_loop()
        deadline = None if slot_timeout is None else loop.time() + slot_timeout
        refusal: KlingError | None = None
        slot: AccountSlot | None = await self._acquire(account, create, deadline, refusal)
        try:
            while True:
                try:
                    task = await self.transport.retrying(
                        create.attempt,
                        "POST",
                        _protocol.EXTEND_PATH,
                        slots=True,
                    )
                except KlingError as error:
                    decision = _protocol.decide(error)
                    if decision.action is not _protocol.Action.WAIT_FOR_SLOT:
                        raise
                    assert slot is not None
                    # A 1303 proves this POST created nothing; an earlier ambiguous try
                    # is still remembered in `create.state` (looked up first).
                    held, slot, refusal = slot, None, error
                    if deadline is not None and loop.time() >= deadline:
                        await account.release(held, maybe_created=create.maybe_created)
                        raise
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(
                            account.refused(held, getattr(error, "retry_after", None)),
                            None if deadline is None else deadline - loop.time(),
                        )
                    slot = await self._acquire(account, create, deadline, refusal)
                    continue
                assert slot is not None
                held, slot = slot, None
                await account.created(held, task)
                return task
        finally:
            if slot is not None:
                await account.release(slot, maybe_created=create.maybe_created)

    async def _acquire(
        self,
        account: Account,
        create: _Create,
        deadline: float | None,
        refusal: KlingError | None,
    ) -> AccountSlot:
        remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            return await within(account.acquire(create.external_id, self.lookup), remaining)
        except asyncio.TimeoutError:
            if refusal is not None:
                raise refusal from None  # refused (1303) until the time ran out
            raise APITimeoutError(
                f"no running-task slot of the account came free within {remaining:g} s",
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
    ) -> Task:
        """Poll (and listen to callbacks) until the task ends; see `wait_for_task`.

        The task's slot in the account, if any, is freed when it ends.
        Reported as a ``kling wait`` span when telemetry records.
        """
        report = (
            _telemetry.operation("kling wait", {"kling.task_id": task_id})
            if _telemetry.AVAILABLE
            else None
        )
        if report is None:
            return await self._wait(task_id, last, timeout, on_update, callbacks)
        with report:
            task = await self._wait(task_id, last, timeout, on_update, callbacks)
            report.task(task)
        return task

    async def _wait(
        self,
        task_id: str,
        last: Task | None,
        timeout: float,
        on_update: OnUpdate | None,
        callbacks: CallbackSource | None,
    ) -> Task:
        account = self.account
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        intervals = self.intervals()
        seen = last.raw_status if last is not None else None
        # A snapshot passed in says how far the task had got, not what it ended with: a
        # create's answer that already says "succeed" carries no videos. Only a task
        # seen here (polled, or from a callback) is returned.
        delay = next(intervals) if last is not None and not last.is_terminal else 0.0
        fresh = False
        #: The status last seen, and the last poll that still said it (not parsed).
        unchanged: _Unchanged | None = None
        subscription = callbacks.subscribe(task_id) if callbacks is not None else None
        try:
            while True:
                if fresh and last is not None and last.is_terminal:
                    if _telemetry.AVAILABLE:
                        _telemetry.task_finished(last)
                    if account is not None:
                        await account.finished(last)
                    if last.failed:
                        raise TaskFailedError(last)
                    return last
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if last is not None and unchanged is not None:
                        last = unchanged.last_seen(last)
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
                    # A snapshot that says "finished" is not the end: fetch it whole.
                    if seen is not None and last is not None and not last.is_terminal:
                        unchanged = unchanged or _Unchanged(seen)
                    update = await self._poll_once(task_id, unchanged, deadline - loop.time())
                if update is not None:
                    unchanged = None  # newer than any answer kept there
                    if update.raw_status != seen:
                        seen = update.raw_status
                        await call_back(on_update, update)
                    last, fresh = update, True
                delay = next(intervals)
        finally:
            if subscription is not None:
                subscription.close()

    async def _poll_once(
        self, task_id: str, unless: _Unchanged | None, remaining: float
    ) -> Task | None:
        try:
            return await within(self.get(task_id, unless), remaining)
        except asyncio.TimeoutError:
            return None
        except KlingError as error:
            if not _protocol.is_retryable(error):
                raise
            logger.warning("polling task %s failed (%s); will look again", task_id, error)
            return None
