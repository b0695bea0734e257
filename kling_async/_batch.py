"""`extend_many`: many extensions at once, within the account's limits, crash-safe.

A fixed pool of `concurrency` workers pulls items from the input one at a time (so a
generator of a million requests is read only as fast as results are consumed) and
hands each result to a bounded queue that the caller's ``async for`` drains.

Kling limits how many tasks an account has *running*. Each worker holds a slot of an
AIMD gate from its create until its task finishes (``wait=True``) or is created
(``wait=False``). A 1303 answer shrinks the gate to what the account accepted and sends
the item to wait for one of the batch's running tasks to finish, without spending its
retries; every accepted create widens the gate by ``1/limit`` again (additive
increase). A no-credit answer (1100-1102) stops all further submissions.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from kling_async import _protocol
from kling_async._checks import is_collection_of_items, is_int_in
from kling_async._deadlines import within
from kling_async._hooks import call_back
from kling_async._journal import FINISHED, PENDING, SUBMITTED, Journal, fingerprint, is_final_error
from kling_async._models import BatchResult, ExtendRequest, Task
from kling_async.errors import KlingError, RateLimitError, TaskFailedError, ValidationError

if TYPE_CHECKING:
    from kling_async._client import CallbackSource, KlingClient

logger = logging.getLogger("kling_async")

#: Longest pause between two tries of an item the account had no room for.
ROOM_WAIT_CAP: Final = 30.0
_DONE: Final = object()


@attrs.frozen
class BatchProgress:
    """A snapshot of a running batch, handed to `extend_many`'s `on_progress`."""

    #: Items whose task has been created so far.
    submitted: int
    #: Items whose task is created and not yet finished (``wait=True`` only).
    running: int
    #: Items finished without an error.
    succeeded: int
    #: Items finished with an error.
    failed: int
    #: Items read from the input that have no task yet.
    pending: int
    #: How many items the batch lets run at once right now (lowered by 1303 answers).
    concurrency: int
    #: 1303 answers (account's running-task limit) seen so far.
    throttled: int = 0
    #: Number of input items, when the input has a length.
    total: int | None = None


OnProgress = Callable[[BatchProgress], "Awaitable[None] | None"]


def _retry_in_batch(error: BaseException) -> bool:
    # A 1303 is the batch's to handle (wait for room), not the request's to retry.
    return _protocol.is_retryable(error) and not _protocol.is_concurrency_limit(error)


class _Gate:
    """How many of the batch's items may hold an account slot: AIMD between 1 and max."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.held = 0
        self.finished = 0  # tasks of this batch that finished: room may have opened
        # Resolved (and dropped) on every change; waiters re-check their condition then.
        # Futures rather than an asyncio.Condition so that releasing needs no await.
        self._change: asyncio.Future[None] | None = None

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def _signal(self) -> None:
        if self._change is not None:
            self._change.set_result(None)
            self._change = None

    async def _next_change(self, timeout: float | None = None) -> None:
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        # Shielded: a waiter that is cancelled or times out must not cancel the others'.
        await within(asyncio.shield(self._change), timeout)

    def try_acquire(self) -> bool:
        if self.held < self.current:
            self.held += 1
            return True
        return False

    async def acquire(self) -> None:
        while not self.try_acquire():
            await self._next_change()

    def release(self, *, task_finished: bool = False) -> None:
        self.held -= 1
        if task_finished:
            self.finished += 1
        self._signal()

    def accepted(self) -> None:
        before = self.current
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if self.current != before:
            self._signal()

    def refused(self) -> None:
        # Everyone else holding a slot is (or is about to be) a running task the account
        # accepted: that is what it takes.
        self.limit = float(max(1, min(self.current - 1, self.held - 1)))

    async def wait_for_room(self, timeout: float) -> None:
        """Wait until one of the batch's tasks finishes, or `timeout` seconds."""
        seen = self.finished
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while self.finished == seen:
                await self._next_change(deadline - loop.time())
        except asyncio.TimeoutError:
            pass


class _Slot:
    """One item's hold on the gate, released exactly once whatever happens."""

    __slots__ = ("_gate", "held")

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        self.held = False

    async def take(self) -> None:
        if not self._gate.try_acquire():
            await self._gate.acquire()
        self.held = True

    def give_back(self, *, task_finished: bool = False) -> None:
        if self.held:
            self.held = False
            self._gate.release(task_finished=task_finished)


class Batch:
    """One run of `extend_many`."""

    def __init__(
        self,
        client: KlingClient,
        requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
        *,
        concurrency: int | None,
        wait: bool,
        journal: str | Path | None,
        on_progress: OnProgress | None,
        callbacks: CallbackSource | None,
    ) -> None:
        if concurrency is None:
            concurrency = client.max_in_flight
        if not is_int_in(concurrency, 1):
            raise ValidationError("concurrency", "must be an integer of at least 1", concurrency)
        if isinstance(requests, AsyncIterable):
            self._aiter: AsyncIterator[ExtendRequest] | None = aiter(requests)
            self._iter: Iterable[ExtendRequest] | None = None
        elif is_collection_of_items(requests):
            self._aiter = None
            self._iter = iter(requests)
        else:
            raise ValidationError("requests", "must be an iterable of ExtendRequest", requests)
        self._client = client
        self._concurrency = concurrency
        self._wait = wait
        self._journal_path = Path(journal) if journal is not None else None
        self._journal: Journal | None = None
        self._on_progress = on_progress
        self._callbacks = callbacks
        self._total = len(requests) if isinstance(requests, Sized) else None
        self._gate = _Gate(concurrency)
        self._results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency)
        self._input_lock = asyncio.Lock()
        self._next_index = 0
        self._input_done = False
        self._no_credit: KlingError | None = None
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
            concurrency=self._gate.current,
            throttled=self.throttled,
            total=self._total,
        )

    async def _report(self) -> None:
        if self._on_progress is not None:
            await call_back(self._on_progress, self.progress())

    async def run(self) -> AsyncIterator[BatchResult]:
        """Yield one result per input item, in completion order."""
        if self._journal_path is not None:
            self._journal = await Journal.open(self._journal_path, service=self._client.base_url)
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
        if not isinstance(request, ExtendRequest):
            error = ValidationError(f"requests[{index}]", "must be an ExtendRequest", request)
            return BatchResult(index=index, request=request, error=error)
        journal = self._journal
        row = None
        print_ = fingerprint(request) if journal is not None else ""
        external_id = request.external_task_id
        if journal is not None:
            row = await journal.load(index)
            if row is not None and row.fingerprint != print_:
                raise ValidationError(
                    "journal",
                    f"item {index} of the input differs from item {index} in {journal.path}; "
                    "a journal belongs to one input: use a new journal file for a new input",
                )
            if row is not None:
                external_id = row.external_task_id
                done = self._from_journal(index, request, row.state, row.task, row.error)
                if done is not None:
                    return done
            external_id = external_id or journal.external_id(index)
        if external_id is not None and external_id != request.external_task_id:
            request = attrs.evolve(request, external_task_id=external_id)
        if self._callbacks is not None and request.callback_url is None:
            request = attrs.evolve(request, callback_url=self._callbacks.url)

        async def record(
            state: str, task: Task | None = None, error: KlingError | None = None
        ) -> None:
            if journal is not None:
                assert request.external_task_id is not None
                await journal.record(
                    index,
                    fingerprint=print_,
                    external_task_id=request.external_task_id,
                    state=state,
                    task=task,
                    error=error,
                )

        resumed_task = row.task if row is not None and row.state == SUBMITTED else None
        slot = _Slot(self._gate)
        await slot.take()
        task_finished = False
        try:
            if resumed_task is not None:
                task = resumed_task
                self.running += 1
            else:
                if self._no_credit is not None:
                    await record(FINISHED, error=self._no_credit)
                    return BatchResult(index=index, request=request, error=self._no_credit)
                if journal is not None and row is None:
                    await record(PENDING)
                try:
                    task = await self._create(request, slot, look_up_first=row is not None)
                except KlingError as error:
                    await record(FINISHED, error=error)
                    return BatchResult(index=index, request=request, error=error)
                self.submitted += 1
                await record(SUBMITTED, task)
                if not self._wait:
                    return BatchResult(index=index, request=request, task=task)
                self.running += 1
            await self._report()
            try:
                final = await self._client.wait_for_task(task, callbacks=self._callbacks)
            except TaskFailedError as error:
                task_finished = True
                await record(FINISHED, error.task, error)
                return BatchResult(index=index, request=request, task=error.task, error=error)
            except KlingError as error:
                await record(FINISHED, getattr(error, "task", task), error)
                return BatchResult(
                    index=index, request=request, task=getattr(error, "task", task), error=error
                )
            finally:
                self.running -= 1
            task_finished = True
            await record(FINISHED, final)
            return BatchResult(index=index, request=request, task=final)
        finally:
            slot.give_back(task_finished=task_finished)

    def _from_journal(
        self,
        index: int,
        request: ExtendRequest,
        state: str,
        task: Task | None,
        error: KlingError | None,
    ) -> BatchResult | None:
        if state == FINISHED and (error is None or is_final_error(error)):
            return BatchResult(index=index, request=request, task=task, error=error)
        if state == SUBMITTED and not self._wait:
            return BatchResult(index=index, request=request, task=task)
        return None

    async def _create(self, request: ExtendRequest, slot: _Slot, *, look_up_first: bool) -> Task:
        """Create the item's task, waiting (not retrying) while the account is full.

        Called holding a gate slot; gives it up while it waits for room.
        """
        refusals = 0
        while True:
            if self._no_credit is not None:
                raise self._no_credit
            try:
                task = await self._client.create(
                    request, retry_if=_retry_in_batch, look_up_first=look_up_first
                )
            except RateLimitError as error:
                if not _protocol.is_concurrency_limit(error):
                    raise
                self.throttled += 1
                refusals += 1
                self._gate.refused()
                slot.give_back()
                await self._wait_for_room(error, refusals)
                await slot.take()
                # The refused POST may follow one that timed out: look before sending.
                look_up_first = True
                continue
            except KlingError as error:
                if _protocol.is_no_credit(error) and self._no_credit is None:
                    logger.warning("no credit left (%s); submitting no more items", error)
                    self._no_credit = error
                raise
            self._gate.accepted()
            return task

    async def _wait_for_room(self, error: RateLimitError, refusals: int) -> None:
        backoff = random.uniform(0, min(ROOM_WAIT_CAP, 0.5 * 2 ** min(refusals, 10)))
        if error.retry_after is not None:
            await asyncio.sleep(error.retry_after)
        if self._wait and self.running:
            await self._gate.wait_for_room(max(backoff, 1.0))
        else:
            await asyncio.sleep(backoff)


async def extend_many(
    client: KlingClient,
    requests: Iterable[ExtendRequest] | AsyncIterable[ExtendRequest],
    *,
    concurrency: int | None = None,
    wait: bool = True,
    journal: str | Path | None = None,
    on_progress: OnProgress | None = None,
    callbacks: CallbackSource | None = None,
) -> AsyncIterator[BatchResult]:
    """See `KlingClient.extend_many`."""
    batch = Batch(
        client,
        requests,
        concurrency=concurrency,
        wait=wait,
        journal=journal,
        on_progress=on_progress,
        callbacks=callbacks,
    )
    async for result in batch.run():
        yield result
