"""`extend_many`: many extensions at once, within the account's limits, crash-safe.

A fixed pool of `concurrency` workers pulls items from the input one at a time (so a
generator of a million requests is read only as fast as results are consumed) and
hands each result to a bounded queue that the caller's ``async for`` drains.

Kling limits how many tasks an account has *running*. Every create goes through an
account (`kling_async._account`): the client's, or a private `InMemoryAccount` of the
batch's own. A slot is held from the create until the task is seen finished; a 1303
answer lowers the account's limit to what it accepted and waits for a slot without
spending the item's retries. A no-credit answer (1100-1102) stops all further
submissions: the items not yet sent come back with that error, unsent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Sized,
)
from pathlib import Path
from typing import Any, Final, cast

import attrs

from kling_async import _protocol, _telemetry
from kling_async._account import Account, AccountSlot, Claim, InMemoryAccount, Lookup
from kling_async._config import is_int_in
from kling_async._hooks import call_back
from kling_async._journal import FINISHED, PENDING, SUBMITTED, Journal, fingerprint
from kling_async._models import WAIT_TIMEOUT, BatchProgress, BatchResult, ExtendRequest, Task
from kling_async._tasks import Tasks
from kling_async._types import CallbackSource, OnProgress
from kling_async.errors import KlingError, ValidationError

logger = logging.getLogger("kling_async")

_DONE: Final = object()


class Batch:
    """One run of `extend_many`."""

    def __init__(
        self,
        tasks: Tasks,
        requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
        *,
        concurrency: int,
        wait: bool,
        journal: str | Path | None,
        on_progress: OnProgress | None,
        callbacks: CallbackSource | None,
        on_update: Callable[[int, Task], object] | None = None,
    ) -> None:
        if not is_int_in(concurrency, 1):
            raise ValidationError("concurrency", "must be an integer of at least 1", concurrency)
        if isinstance(requests, AsyncIterable):
            self._aiter: AsyncIterator[ExtendRequest] | None = aiter(requests)
            self._iter: Iterable[ExtendRequest] | None = None
        elif isinstance(given := cast(object, requests), Iterable) and not isinstance(
            given, (str, bytes)
        ):
            self._aiter = None
            self._iter = iter(requests)
        else:
            raise ValidationError("requests", "must be an iterable of ExtendRequest", requests)
        self._own_account = tasks.account is None
        self._account: Account = tasks.account or InMemoryAccount()
        # The batch's creates and waits go through its gate to the account: the gate
        # holds back creates once the batch stopped, and counts 1303 refusals.
        self._gate = _Gate(self._account, self)
        self._tasks = Tasks(tasks.transport, tasks.poll, self._gate)
        self._concurrency = concurrency
        self._wait = wait
        self._journal_path = Path(journal) if journal is not None else None
        self._journal: Journal | None = None
        self._on_progress = on_progress
        self._callbacks = callbacks
        self._on_update = on_update
        self._total = len(requests) if isinstance(requests, Sized) else None
        self._results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency)
        self._input_lock = asyncio.Lock()
        self._next_index = 0
        self._input_done = False
        self._stopped: KlingError | None = None
        self.pulled = 0
        self.submitted = 0
        self.running = 0
        self.succeeded = 0
        self.failed = 0
        self.throttled = 0

    def progress(self) -> BatchProgress:
        """The batch's counters now."""
        return BatchProgress(
            submitted=self.submitted,
            running=self.running,
            succeeded=self.succeeded,
            failed=self.failed,
            pending=self.pulled - self.running - self.succeeded - self.failed,
            concurrency=min(self._concurrency, self._account_limit()),
            throttled=self.throttled,
            total=self._total,
        )

    def _account_limit(self) -> int:
        # Both accounts have `limit`; another `Account` implementation need not.
        limit = getattr(self._account, "limit", None)
        return limit if isinstance(limit, int) else self._concurrency

    async def _report(self) -> None:
        if self._on_progress is not None:
            await call_back(self._on_progress, self.progress())

    async def run(self) -> AsyncGenerator[BatchResult, None]:
        """Yield one result per input item, in completion order."""
        if self._journal_path is not None:
            # Held (locked) until the `finally` below closes it: a second run on the same
            # journal is refused here, before any request.
            self._journal = await Journal.open(
                self._journal_path, service=self._tasks.transport.base_url
            )
        workers = [asyncio.ensure_future(self._worker()) for _ in range(self._concurrency)]
        try:
            running = len(workers)
            while running:
                item = await self._results.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            if self.throttled:
                logger.info(
                    "batch done; the account's task limit (1303) was hit %d times", self.throttled
                )
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._own_account:
                await self._account.aclose()
            if self._journal is not None:
                await self._journal.close()

    async def _pull(self) -> tuple[int, Any] | None:
        assert self._aiter is not None  # a plain iterator needs no lock: `_pull_sync`
        async with self._input_lock:
            if self._input_done:
                return None
            try:
                request = await anext(self._aiter)
            except StopAsyncIteration:
                self._input_done = True
                return None
            return self._numbered(request)

    def _pull_sync(self) -> tuple[int, Any] | None:
        if self._input_done:
            return None
        try:
            request = next(self._iter)  # type: ignore[call-overload]
        except StopIteration:
            self._input_done = True
            return None
        return self._numbered(request)

    def _numbered(self, request: Any) -> tuple[int, Any]:
        index = self._next_index
        self._next_index += 1
        self.pulled += 1
        return index, request

    async def _worker(self) -> None:
        try:
            while (
                item := self._pull_sync() if self._aiter is None else await self._pull()
            ) is not None:
                result = await self._item(*item)
                if result.ok:
                    self.succeeded += 1
                else:
                    self.failed += 1
                if self._on_progress is not None:
                    await self._report()
                if self._results.full():
                    await self._results.put(result)  # the consumer is behind: wait for it
                else:
                    self._results.put_nowait(result)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # input or journal trouble ends the whole batch
            await self._results.put(error)
        await self._results.put(_DONE)

    async def _item(self, index: int, request: Any) -> BatchResult:
        """One item: resume it from the journal, submit it, wait for its task."""
        if not isinstance(request, ExtendRequest):
            error = ValidationError(f"requests[{index}]", "must be an ExtendRequest", request)
            return BatchResult(index=index, request=request, error=error)
        item = await _Item.resume(self._journal, index, request)
        if self._callbacks is not None and item.request.callback_url is None:
            item.request = attrs.evolve(item.request, callback_url=self._callbacks.url)
        if item.done is not None:
            return item.done
        if item.task is None:
            submitted = await self._submit(item)
            if isinstance(submitted, BatchResult):
                return submitted
            item.task = submitted
        elif item.trace is not None and _telemetry.AVAILABLE:
            # Resumed: this run's spans link back to the run that created the task.
            _telemetry.link_back(item.trace, "kling resume", {"kling.task_id": item.task.task_id})
        if not self._wait:
            return BatchResult(index=index, request=item.request, task=item.task)
        return await self._wait_for(item, item.task)

    async def _submit(self, item: _Item) -> Task | BatchResult:
        """Create the item's task (its journal row durable first), or its failure."""
        if self._stopped is not None:
            await item.record(FINISHED, error=self._stopped)
            return item.result(error=self._stopped)
        await item.record_pending()
        try:
            task = await self._tasks.create(item.request, look_up_first=item.look_up_first)
        except KlingError as error:
            stop = _protocol.decide(error).action is _protocol.Action.STOP_BATCH
            if stop and self._stopped is None:
                # No credit, or credentials refused: every further create would fail.
                logger.warning("%s; submitting no more items", error)
                self._stopped = error
            await item.record(FINISHED, error=error)
            return item.result(error=error)
        self.submitted += 1
        if self._on_update is not None:
            await call_back(self._on_update, item.index, task)
        trace = _telemetry.created_traceparent() if _telemetry.AVAILABLE else None
        await item.record(SUBMITTED, task, trace=trace)
        if not self._wait and self._own_account:
            # Nobody will watch this task: the batch's private slots count only the
            # creates in flight. A shared account keeps it until it is seen finished
            # (by its own check if by no one else).
            await self._account.finished(task)
        return task

    async def _wait_for(self, item: _Item, task: Task) -> BatchResult:
        self.running += 1
        await self._report()
        try:
            final = await self._tasks.wait(
                task.task_id,
                task,
                timeout=WAIT_TIMEOUT,
                on_update=None if self._on_update is None else self._item_update(item.index),
                callbacks=self._callbacks,
            )
        except KlingError as error:  # TaskFailedError and WaitTimeoutError carry `.task`
            seen = getattr(error, "task", task)
            await item.record(FINISHED, seen, error)
            return item.result(task=seen, error=error)
        finally:
            self.running -= 1
        await item.record(FINISHED, final)
        return item.result(task=final)

    def _item_update(self, index: int) -> Callable[[Task], Any]:
        assert self._on_update is not None
        on_update = self._on_update

        def update(task: Task) -> Any:
            return on_update(index, task)

        return update


class _Gate(Account):
    """The batch's way to its account: every call goes through to `account`, but a
    create that gets its slot after the batch stopped (no credit, credentials refused)
    gives it back and fails unsent, and every 1303 refusal is counted."""

    def __init__(self, account: Account, batch: Batch) -> None:
        self._account = account
        self._batch = batch
        self.max_running = account.max_running

    async def acquire(self, external_task_id: str, lookup: Lookup) -> AccountSlot:
        slot = await self._account.acquire(external_task_id, lookup)
        if (stopped := self._batch._stopped) is not None:
            await self._account.release(slot)
            raise stopped
        return slot

    async def refused(self, slot: AccountSlot, retry_after: float | None = None) -> None:
        self._batch.throttled += 1
        await self._account.refused(slot, retry_after)

    async def created(self, slot: AccountSlot, task: Task) -> None:
        await self._account.created(slot, task)

    async def release(self, slot: AccountSlot, *, maybe_created: bool = False) -> None:
        await self._account.release(slot, maybe_created=maybe_created)

    async def finished(self, task: Task) -> None:
        await self._account.finished(task)

    async def claim(self, external_task_id: str) -> Claim:
        return await self._account.claim(external_task_id)

    async def settle(
        self, external_task_id: str, task: Task | None, *, maybe_created: bool = False
    ) -> None:
        await self._account.settle(external_task_id, task, maybe_created=maybe_created)


@attrs.define(eq=False)
class _Item:
    """One input item and what its journal knows of it (without a journal: nothing)."""

    index: int
    #: The request as it is sent: with the external id the journal fixed for it.
    request: ExtendRequest
    journal: Journal | None
    fingerprint: str = ""
    #: The journal has a row for it (an earlier run got this far).
    known: bool = False
    #: Its task, when an earlier run created it (submitted, not finished).
    task: Task | None = None
    #: The item's result, when the journal has it finished for good.
    done: BatchResult | None = None
    #: Look the task up by its external id before the first POST: see `Tasks.create`.
    look_up_first: bool | None = None
    #: The trace context of the create that made its task, in an earlier run.
    trace: str | None = None

    @classmethod
    async def resume(cls, journal: Journal | None, index: int, request: ExtendRequest) -> _Item:
        """The item as the journal left it: a finished result, a task, or nothing yet."""
        if journal is None:
            return cls(index, request, None)
        print_ = fingerprint(request)
        row = await journal.load(index)
        if row is not None and row.fingerprint != print_:
            raise ValidationError(
                "journal",
                f"item {index} of the input differs from item {index} in {journal.path}; "
                "a journal belongs to one input: use a new journal file for a new input",
            )
        own_id = request.external_task_id
        external_id = row.external_task_id if row is not None else None
        external_id = external_id or own_id or journal.external_id(index)
        if external_id != own_id:
            request = attrs.evolve(request, external_task_id=external_id)
        item = cls(index, request, journal, print_, known=row is not None)
        # A resumed journal may have lost rows (a copy without its -wal, an OS crash): any
        # item it has not finished may have been sent, row or no row. An id the journal
        # made for a fresh run cannot have been used; the caller's own may have been (the
        # default rule of `Tasks.create` looks it up).
        if external_id != own_id:
            item.look_up_first = row is not None or journal.resumed
        if row is not None:
            if row.state == FINISHED and (row.error is None or _protocol.decide(row.error).final):
                item.done = item.result(task=row.task, error=row.error)
            elif row.state == SUBMITTED:
                item.task = row.task
                item.trace = row.trace
        return item

    def result(self, *, task: Task | None = None, error: KlingError | None = None) -> BatchResult:
        return BatchResult(index=self.index, request=self.request, task=task, error=error)

    async def record_pending(self) -> None:
        """Durably note "about to POST" (synchronous=FULL) for an item with no row yet."""
        if not self.known:
            await self.record(PENDING)

    async def record(
        self,
        state: str,
        task: Task | None = None,
        error: KlingError | None = None,
        *,
        trace: str | None = None,
    ) -> None:
        if self.journal is None:
            return
        assert self.request.external_task_id is not None
        await self.journal.record(
            self.index,
            fingerprint=self.fingerprint,
            external_task_id=self.request.external_task_id,
            state=state,
            task=task,
            error=error,
            trace=trace,
        )
        self.known = True


async def extend_many(
    tasks: Tasks,
    requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
    *,
    concurrency: int,
    wait: bool = True,
    journal: str | Path | None = None,
    on_progress: OnProgress | None = None,
    callbacks: CallbackSource | None = None,
    on_update: Callable[[int, Task], object] | None = None,
) -> AsyncGenerator[BatchResult, None]:
    """See `KlingClient.extend_many`; `on_update(index, task)` hears each item's task
    status as it changes (the command line's per-row display uses it)."""
    batch = Batch(
        tasks,
        requests,
        concurrency=concurrency,
        wait=wait,
        journal=journal,
        on_progress=on_progress,
        callbacks=callbacks,
        on_update=on_update,
    )
    # Closed here, not left to the loop's finalizer: leaving the caller's `async for`
    # cancels the items in flight before `aclose()` returns.
    results = batch.run()
    try:
        async for result in results:
            yield result
    finally:
        await results.aclose()
