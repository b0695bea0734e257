"""An account's running-task slots: the `Account` interface and `InMemoryAccount`.

Kling limits how many tasks an account has *running* (from ``submitted`` until it
finishes), whichever process created them; a create past the limit answers 429 code
1303. An account object keeps those slots so that everyone who shares it stays within
the limit instead of learning it from 1303 answers one request at a time.

The create-and-wait layer (`kling_async._tasks`) drives an account like this::

    claim = await account.claim(external_id)  # only for a caller-given id
    if claim.task is not None:
        return claim.task  # another create with this id made it: nothing is sent
    # claim.maybe_since: an earlier create of this id may have reached the service
    slot = await account.acquire(external_id, lookup)  # waits, FIFO, cancellable
    POST ...  (the slot is *creating*: no check of anyone's may free it)
        1303    -> await account.refused(slot, retry_after); slot = await account.acquire(...)
        created -> await account.created(slot, task)  # the slot now holds task.task_id
        failed  -> await account.release(slot, maybe_created=...)
    await account.settle(external_id, task_or_none, maybe_created=...)
    ... later, whoever sees the task finished: await account.finished(task)

`InMemoryAccount` keeps the slots of one process; `kling_async.redis.RedisAccount`
keeps them in Redis for many processes and machines. Both implement `Account`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs

from kling_async import _protocol, _telemetry
from kling_async._config import is_int_in
from kling_async._deadlines import IO_TIMEOUT
from kling_async._models import Task
from kling_async.errors import ConfigurationError

__all__ = ["IO_TIMEOUT", "Account", "AccountSlot", "Claim", "InMemoryAccount", "Lookup"]

logger = logging.getLogger("kling_async")

#: Looks a task up by its external task id; None when the service says it does not exist.
Lookup = Callable[[str], Awaitable["Task | None"]]

#: A slot whose task nobody reported for this long is looked up by the account itself
#: (a task created with `extend` and never waited on must not hold its slot forever).
CHECK_AFTER: Final = 15.0
#: How many settled external ids an `InMemoryAccount` remembers (oldest forgotten first).
SETTLED_MEMORY: Final = 10_000


@attrs.frozen
class Claim:
    """What `Account.claim` knows of an external task id before its create."""

    #: An earlier create of this id made this task: return it and send nothing.
    task: Task | None = None
    #: Seconds ago an earlier create of this id may have reached the service without its
    #: outcome being known (it ended ambiguously, its holder died, or its claim was lost):
    #: a look-up's "no such task" proves nothing until that request can no longer arrive.
    #: None: nothing is known against a fresh create.
    maybe_since: float | None = None


@attrs.define(eq=False)
class AccountSlot:
    """One running-task slot, from `Account.acquire` until its task is seen finished."""

    #: The id the create is sent with: how the account finds the task if its holder dies.
    external_task_id: str
    #: Set by `Account.created`: the task that holds the slot.
    task_id: str | None = None
    #: The implementation's own handle (a lease id in Redis).
    token: str = ""
    #: True from `Account.acquire` until `created`, `refused` or `release`: its create is
    #: under way in a live process, so no check (the account's own, another process's)
    #: may look it up and free it, however long the create takes.
    creating: bool = True


class Account(abc.ABC):
    """Where an account's running-task slots are kept (see the module docstring).

    Every method is safe to call from many tasks at once. Methods that give something
    back (`release`, `refused`, `finished`, `settle`) may be called while the caller is
    being cancelled: an implementation that does I/O must finish that I/O anyway.
    """

    #: The plan's limit when it was given; None when it is learned from 1303 answers.
    max_running: int | None

    @abc.abstractmethod
    async def acquire(self, external_task_id: str, lookup: Lookup) -> AccountSlot:
        """Take a slot for a create, waiting (first come, first served) while none is free.

        `lookup` lets the account check the task of a slot whose holder went quiet.
        """

    @abc.abstractmethod
    async def created(self, slot: AccountSlot, task: Task) -> None:
        """The slot's create was accepted: it holds `task` until that is seen finished."""

    @abc.abstractmethod
    async def refused(self, slot: AccountSlot, retry_after: float | None = None) -> None:
        """The create got 1303: lower the limit at once, give the slot back, and return
        when trying again is worthwhile (a slot came free, or a backoff passed)."""

    @abc.abstractmethod
    async def release(self, slot: AccountSlot, *, maybe_created: bool = False) -> None:
        """The create failed. With `maybe_created` (the request may have reached the
        service) the slot is kept until a look-up shows the task absent or finished."""

    @abc.abstractmethod
    async def finished(self, task: Task) -> None:
        """`task` was seen finished (a poll, a callback, `get_task`): free its slot.

        Never waits on I/O: the caller's wait has its answer and must not be delayed or
        failed by the bookkeeping (a job queue would run a failed job again)."""

    @abc.abstractmethod
    async def claim(self, external_task_id: str) -> Claim:
        """Claim a caller-given external task id before creating its task.

        Returns a `Claim` without a task when this caller now owns the id (and must
        `settle` it), or with the task an earlier create with the same id made (waiting
        while that create is running).
        """

    @abc.abstractmethod
    async def settle(
        self, external_task_id: str, task: Task | None, *, maybe_created: bool = False
    ) -> None:
        """End a claim: with the task created, or None when the create failed; with
        `maybe_created` the failed create may have reached the service, and the next
        claim of the id says so (`Claim.maybe_since`)."""

    async def aclose(self) -> None:  # noqa: B027 - optional for implementations
        """Release what the account holds open (connections, background tasks)."""


@attrs.define(eq=False)
class _Held:
    """A slot this process holds, with how to look its task up (for both accounts)."""

    slot: AccountSlot
    lookup: Lookup
    #: `time.monotonic()` when its task was last seen (or checked).
    seen: float
    maybe_created: bool = False
    #: A look-up of its task is under way (`RedisAccount` checks concurrently).
    checking: bool = False

    @property
    def creating(self) -> bool:
        """Its create is under way: never looked up, never freed by a check."""
        return self.slot.creating

    def ambiguous(self) -> None:
        """Its create ended without a task but may have reached the service: look it up
        once a request it sent can no longer arrive (`_protocol.absence_settle`)."""
        self.slot.creating = False
        self.maybe_created = True
        self.seen = time.monotonic() + _protocol.absence_settle() - CHECK_AFTER


class InMemoryAccount(Account):
    """The running-task slots of one process, shared by every client and call given it.

    Args:
        max_running: the plan's limit of running tasks, when known. Without it the limit
            is learned, as TCP learns a window: it starts at 1 and grows by one slot for
            each create accepted while at the limit (so it doubles per round of creates)
            until the first 1303; that answer lowers it at once to what the account
            accepted, and from then on it grows by ``1/limit`` per accepted create.
    """

    def __init__(self, *, max_running: int | None = None) -> None:
        if max_running is not None and not is_int_in(max_running, 1):
            raise ConfigurationError("max_running must be an integer of at least 1, or None")
        self.max_running = max_running
        self._limit = float(max_running or 1)
        #: Growing fast until the first 1303 (only when the limit is learned).
        self._slow_start = max_running is None
        self._held: dict[int, _Held] = {}
        self._by_task: dict[str, AccountSlot] = {}
        # Waiters for a slot, first come first served; a woken waiter's slot is reserved
        # until it runs, so a newcomer cannot take it in between.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reserved = 0
        # Resolved (and replaced) whenever a slot is freed: what `refused` waits on.
        self._freed: asyncio.Future[None] | None = None
        self._claims: dict[str, asyncio.Future[Task | None]] = {}
        self._settled: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._checking: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        learned = "" if self.max_running is not None else " (learned)"
        return f"<InMemoryAccount running={len(self._held)} limit={self.limit}{learned}>"

    @property
    def limit(self) -> int:
        """How many slots may be taken now: `max_running`, or the limit learned so far."""
        return max(1, int(self._limit))

    @property
    def running(self) -> int:
        """Slots taken now (tasks created and not yet seen finished, and creates under way)."""
        return len(self._held)

    def _room(self) -> int:
        return self.limit - len(self._held) - self._reserved

    # -- slots ---------------------------------------------------------------------------

    async def acquire(self, external_task_id: str, lookup: Lookup) -> AccountSlot:
        if self._waiters or self._room() <= 0:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._start_checking()
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._reserved -= 1  # handed a slot it will not use: pass it on
                    self._wake()
                else:
                    with contextlib.suppress(ValueError):  # `_wake` may have dropped it
                        self._waiters.remove(waiter)
                raise
            self._reserved -= 1
        slot = AccountSlot(external_task_id)
        self._held[id(slot)] = _Held(slot, lookup, time.monotonic())
        return slot

    def _wake(self) -> None:
        while self._waiters and self._room() > 0:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._reserved += 1

    def _free(self, slot: AccountSlot) -> None:
        if self._held.pop(id(slot), None) is None:
            return
        if slot.task_id is not None:
            self._by_task.pop(slot.task_id, None)
        if self._freed is not None:
            self._freed.set_result(None)
            self._freed = None
        self._wake()

    async def created(self, slot: AccountSlot, task: Task) -> None:
        held = self._held.get(id(slot))
        if held is None:
            return
        slot.task_id = task.task_id
        slot.creating = False
        held.seen = time.monotonic()
        held.maybe_created = False
        if task.is_terminal:
            self._free(slot)
            return
        self._by_task[task.task_id] = slot
        if self.max_running is None and len(self._held) >= self.limit:
            # Only while at the limit: room nobody asked for proves nothing.
            self._limit += 1.0 if self._slow_start else 1.0 / self._limit
            if _telemetry.AVAILABLE:
                _telemetry.account_limit(self.limit, type(self).__name__)
            self._wake()

    async def refused(self, slot: AccountSlot, retry_after: float | None = None) -> None:
        if self.max_running is None:
            # Everyone else holding a slot is a running task the account accepted.
            self._limit = float(max(1, len(self._held) - 1))
            self._slow_start = False
            if _telemetry.AVAILABLE:
                _telemetry.account_limit(self.limit, type(self).__name__)
        slot.creating = False
        self._free(slot)  # our own slot freeing is not the news we wait for
        if self._freed is None:
            self._freed = asyncio.get_running_loop().create_future()
        freed = self._freed
        # Wait for one of our tasks to finish; when none of ours runs, the tasks filling
        # the account are someone else's, and only time tells: a jittered backoff.
        wait = _protocol.refused_wait(retry_after, ours_running=bool(self._held))
        await asyncio.wait((asyncio.shield(freed),), timeout=wait)

    async def release(self, slot: AccountSlot, *, maybe_created: bool = False) -> None:
        held = self._held.get(id(slot))
        if held is None:
            return
        if not maybe_created:
            slot.creating = False
            self._free(slot)
            return
        held.ambiguous()
        self._start_checking()

    async def finished(self, task: Task) -> None:
        slot = self._by_task.get(task.task_id)
        if slot is not None:
            self._free(slot)

    # -- the account's own check -----------------------------------------------------------

    def _start_checking(self) -> None:
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_loop())

    async def _check_loop(self) -> None:
        # Runs while someone waits for a slot or a slot's task is unknown; looks up the
        # tasks nobody reported for CHECK_AFTER seconds and frees those that finished.
        while self._waiters or any(h.maybe_created for h in self._held.values()):
            await asyncio.sleep(min(1.0, CHECK_AFTER / 4))
            now = time.monotonic()
            for held in list(self._held.values()):
                if not held.creating and now - held.seen >= CHECK_AFTER:
                    held.seen = now
                    await self._check(held)

    async def _check(self, held: _Held) -> None:
        try:
            task = await held.lookup(held.slot.external_task_id)
        except Exception as error:  # the check is best effort: try again later
            logger.info("account check of %s failed: %s", held.slot.external_task_id, error)
            return
        if task is None or task.is_terminal:
            self._free(held.slot)
        elif held.slot.task_id is None:
            held.slot.task_id = task.task_id
            held.maybe_created = False
            self._by_task[task.task_id] = held.slot

    # -- exactly once ------------------------------------------------------------------------

    async def claim(self, external_task_id: str) -> Claim:
        # An earlier ambiguous create of the id in this process is remembered by the
        # create layer itself (it needs that without an account too): no `maybe_since`.
        while True:
            known = self._settled.get(external_task_id)
            if known is not None:
                return Claim(known)
            running = self._claims.get(external_task_id)
            if running is None:
                self._claims[external_task_id] = asyncio.get_running_loop().create_future()
                return Claim()
            task = await asyncio.shield(running)
            if task is not None:
                return Claim(task)

    async def settle(
        self, external_task_id: str, task: Task | None, *, maybe_created: bool = False
    ) -> None:
        running = self._claims.pop(external_task_id, None)
        if task is not None:
            self._settled[external_task_id] = task
            if len(self._settled) > SETTLED_MEMORY:
                self._settled.popitem(last=False)
        if running is not None and not running.done():
            running.set_result(task)

    async def aclose(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)
