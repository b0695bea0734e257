"""`RedisAccount`: an account's running-task slots kept in Redis, shared by many processes.

Needs the ``redis`` extra (``pip install 'kling-async[redis]'``), built on
``redis.asyncio`` from redis-py. Every process and machine that names the same Redis and
the same ``name`` shares the slots::

    from kling_async import KlingClient
    from kling_async.redis import RedisAccount

    account = RedisAccount("redis://localhost:6379/0", max_running=4)
    async with KlingClient(account=account) as kling:
        ...
    await account.aclose()

What is guaranteed, with Redis paused (``SIGSTOP``, a stalled host) for any length of
time, restarted without persistence, or unreachable, and with processes killed; as long
as a live process's own event loop does not stall for longer than a lease (then its
leases and, after ``CLAIM_LEASES`` leases, its claims lapse as if it had died, and it
logs a WARNING when it sees a claim of its own lost):

- **Never over the limit.** Slots are taken by Lua scripts, so two processes never take
  the last one together. A slot is freed only by its holder, by whoever sees its task
  finished, or, when its holder stopped renewing it, after a look-up of its task finds
  it finished or absent (and only if nobody renewed it during the look-up). A slot whose
  create is under way is never looked up: not by its own process's check, and not by
  others, to whom a lease its holder renews never looks expired.
- **Exactly once per external id.** ``claim`` grants an id to one create at a time;
  ``settle`` stores the created task for ``SETTLED_TTL`` seconds, so a later create of
  that id, in any process, gets it. A create that ended ambiguously (``settle(...,
  maybe_created=True)``, kept ``SETTLED_TTL`` seconds) or whose claimer stopped renewing
  leaves a record: the next claim returns `Claim.maybe_since`, so its create looks the
  task up first. A claim granted to a call that timed out is dropped by the process's
  renewals, or taken over by its next claim of that id (nothing was sent with it).
- **Time is Redis's answering time.** Every expiry (leases, claims, queue places,
  process registrations) runs on a logical clock kept in Redis (``kling:{name}:clock``)
  that advances only while Redis answers: each script reads ``TIME`` and advances it by
  the time since the last script, at most ``lease / 3`` (a longer gap means Redis was
  paused, unreachable or idle: nobody could renew meanwhile). A lease lapses only after
  its holder failed to renew it for one lease of time during which Redis answered; a
  pause of any length lapses nothing, and waiting creates resume within one lease of
  Redis answering again.
- **Redis that comes back empty** (a restart without persistence) hands out
  no slot and grants no claim for one lease of that clock: the *quarantine*, during
  which live holders notice the new epoch at their next renewal and put their slots,
  claims and queue places back. It is told from the first use of ``name`` by Redis's
  uptime: with no epoch on a Redis up for longer than a lease, nobody renewed anything
  under the name for a lease, so there is nothing to put back and no wait (a ``FLUSHALL``
  or an eviction on a long-running Redis is taken for a first use). Redis counts its
  uptime in whole seconds: with a lease under a second, only a first use in Redis's
  first second after a restart is quarantined (the default lease is 30 s). Records of
  ended creates (tasks, ``maybe`` records) lost with the data are lost.
- **The limit is stored with the account.** Every process registers its
  ``max_running`` (renewed while the account is open); the limit is the smallest given
  by a live process. A process given another value than a live peer logs a WARNING
  naming both. A process without ``max_running`` learns the limit from 1303 answers
  (below) but never exceeds one given by a live process.
- **Bounded calls.** Every Redis call is bounded by ``IO_SHARE`` of the client's
  timeout (and at most one lease); a create that cannot reach Redis fails with
  `kling_async.APIConnectionError` naming Redis: no task is created without a slot. A
  create already queued (or waiting on another's claim) rides out an outage of up to
  ``OUTAGE_WAIT`` seconds. ``finished`` never waits on Redis: the slot is given back in
  the background (`aclose` waits for that at most ``CLOSE_WAIT`` seconds). A give-back
  or an abandoned take that failed, or that may reach Redis after its call timed out, is
  repeated by the renewals for ``DROP_LEASES`` leases.

How it works (all keys under ``kling:{name}:``; the braces make them one Redis Cluster
hash slot): a slot is a *lease*, a hash entry holding its external task id (and, once
known, its task id) with a logical expiry in a sorted set, indexed by external id, so a
finished task frees its slot by its external id without the create writing anything
more (one round trip to take a slot, one to give it back). Holders renew every
``lease / 3``. Waiters queue in a sorted set (first come, first served across processes)
and wake on a pub/sub message when a slot frees, with a re-check every ``lease / 3``; a
waiter whose place was lost takes a new one. A learned limit (no ``max_running``) starts
at 1 and grows by one slot per create accepted at the limit (doubling per round of
creates) until the first 1303, which lowers it at once to the slots held less one; from
then on it grows by ``1 / limit`` per create accepted at the limit, exactly as
`kling_async.InMemoryAccount` learns it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

import attrs
import orjson

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "kling_async.redis needs redis-py: pip install 'kling-async[redis]'"
    ) from error

from kling_async import _protocol
from kling_async._account import (
    CHECK_AFTER,
    IO_TIMEOUT,
    Account,
    AccountSlot,
    Claim,
    Lookup,
    _Held,
)
from kling_async._config import is_int_in, is_seconds, is_text
from kling_async._converter import converter
from kling_async._models import Task
from kling_async._redis_scripts import (
    ABANDON,
    ACQUIRE,
    CLAIM,
    CREATED,
    EXPIRED,
    KEY_NAMES,
    REFUSED,
    RELEASE,
    RENEW,
    SETTLE,
)
from kling_async.errors import APIConnectionError, ConfigurationError

__all__ = ["RedisAccount"]

logger = logging.getLogger("kling_async")

_T = TypeVar("_T")

#: How long a settled claim (the created task, or a ``maybe`` record) is kept, in seconds.
SETTLED_TTL: Final = 24 * 3600
#: A claim lives this many leases (of Redis's answering time) without renewal before
#: another create may take it over.
CLAIM_LEASES: Final = 3
#: How often a second claimer looks again when no pub/sub message came, in seconds.
CLAIM_POLL: Final = 0.5
#: The shortest lease accepted, in seconds.
MIN_LEASE: Final = 0.1
#: A create already queued for a slot (or waiting on another's claim) keeps waiting
#: through a Redis outage this long, in seconds, before failing.
OUTAGE_WAIT: Final = 60.0
#: One Redis call may take this share of the client's timeout (and at most a lease).
IO_SHARE: Final = 0.8
#: `aclose` waits this long at most for background give-backs, in seconds.
CLOSE_WAIT: Final = 5.0
#: A give-back that failed is retried at renewals for this many leases.
DROP_LEASES: Final = 3


@attrs.define(eq=False)
class _Waiter:
    id: str
    lookup: Lookup
    wake: asyncio.Event = attrs.field(factory=asyncio.Event)


class _Outage:
    """Whether a create waiting in Redis (for a slot, for another's claim) keeps waiting
    when a call fails: a new create fails at once (its caller decides what to do), one
    already waiting rides out an outage (a pause, a restart) for `OUTAGE_WAIT` seconds.

    Every failed call here is an `APIConnectionError` sent to Redis only, which
    `_protocol.decide` always answers with "retry"; what is Redis's own is how long.
    """

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since: float | None = None

    def gives_up(self, first: bool) -> bool:
        now = time.monotonic()
        self.since = self.since or now
        return first or now - self.since > OUTAGE_WAIT

    def over(self) -> None:
        self.since = None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisAccount(Account):
    """An account's running-task slots kept in Redis (see the module docstring).

    Args:
        redis: a ``redis://`` (or ``rediss://``, ``unix://``) URL, or a
            ``redis.asyncio.Redis``. One passed in is never closed by the account; one
            made from a URL is closed by `aclose`.
        name: which account: everyone using the same Redis and name shares the slots.
        max_running: the plan's limit of running tasks, when known; otherwise the limit
            is learned from 1303 answers by everyone on the account. When processes
            give different values, the smallest one of a live process applies.
        lease: seconds of Redis answering time a slot (or claim, queue place) outlives
            its holder's last renewal (renewed every ``lease / 3``). Longer rides out
            longer stalls of the holder's own event loop; shorter frees a killed
            process's slots sooner. Also the longest a Redis call may take, and how long
            a Redis that lost its data hands nothing out.

    Raises:
        ConfigurationError: a bad argument (the URL is never repeated in the message).
    """

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        name: str = "default",
        max_running: int | None = None,
        lease: float = 30.0,
    ) -> None:
        if max_running is not None and not is_int_in(max_running, 1):
            raise ConfigurationError("max_running must be an integer of at least 1, or None")
        if not is_seconds(lease) or lease < MIN_LEASE:
            raise ConfigurationError("lease must be a finite number of seconds, at least 0.1")
        if not is_text(name):
            raise ConfigurationError("name must be a non-empty string")
        if isinstance(redis, str):
            try:
                self._redis = aioredis.Redis.from_url(redis)
            except ValueError:
                raise ConfigurationError(
                    "the Redis URL is not valid (redis://, rediss:// or unix://)"
                ) from None
            self._own_redis = True
        elif isinstance(redis, aioredis.Redis):
            self._redis = redis
            self._own_redis = False
        else:
            raise ConfigurationError("redis must be a URL or a redis.asyncio.Redis")
        self.max_running = max_running
        self.name = name
        self.lease = float(lease)
        self._lease_ms = max(3, int(self.lease * 1000))
        self._tick = self.lease / 3
        self._id = uuid.uuid4().hex
        # Ids of this process's waiters, slots, claims and calls: unique across processes
        # by `_id`, within it by a counter (one uuid4 per account, not three per create).
        self._serial = itertools.count()
        prefix = f"kling:{{{name}}}:"
        self._prefix = prefix
        self._keys = [prefix + key for key in KEY_NAMES]
        self._freed_channel = self._keys[6]
        self._settled_channel = self._keys[16]
        register = self._redis.register_script
        self._acquire_script = register(ACQUIRE)
        self._created_script = register(CREATED)
        self._release_script = register(RELEASE)
        self._refused_script = register(REFUSED)
        self._abandon_script = register(ABANDON)
        self._expired_script = register(EXPIRED)
        self._renew_script = register(RENEW)
        self._claim_script = register(CLAIM)
        self._settle_script = register(SETTLE)
        self._epoch: str | None = None
        self._limit = max_running or 1
        self._warned: set[int] = set()
        self._held: dict[str, _Held] = {}
        self._by_task: dict[str, str] = {}
        self._by_ext: dict[str, str] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # A waiter's first take (which queues it in Redis) goes through this lock, so the
        # Redis queue holds this process's waiters in the order of `_waiters`.
        self._queueing = asyncio.Lock()
        # Claims this process's creates hold: external id -> the claim call's id.
        self._claims: dict[str, str] = {}
        self._claiming: collections.Counter[str] = collections.Counter()
        self._claim_waits: dict[str, asyncio.Event] = {}
        # Lease ids to free and claims to drop at the next renewals (a give-back or an
        # abandoned take that may have reached Redis after its call timed out), with
        # the monotonic time after which they are forgotten.
        self._drops: dict[str, float] = {}
        self._dropped_claims: dict[tuple[str, str], float] = {}
        self._freed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._renewing: asyncio.Task[None] | None = None
        self._listening: asyncio.Task[None] | None = None
        self._subscribing = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        learned = "" if self.max_running is not None else " (learned)"
        return (
            f"<RedisAccount name={self.name!r} limit={self.limit}{learned}"
            f" lease={self.lease:g} holding={len(self._held)}>"
        )

    @property
    def limit(self) -> int:
        """How many slots may be taken, as this process last saw it in Redis: the
        smallest `max_running` of a live process, or the learned limit."""
        return self._limit

    def _note_limit(self, limit: object, low: object = 0, high: object = 0) -> None:
        if isinstance(limit, int) and limit >= 1:
            self._limit = limit
        own = self.max_running
        if own is None:
            return
        for other in (low, high):
            if isinstance(other, int) and other >= 1 and other not in {own, *self._warned}:
                self._warned.add(other)
                logger.warning(
                    "account %r: this process was given max_running=%d, another process"
                    " on it was given max_running=%d; the smallest, %d, applies",
                    self.name,
                    own,
                    other,
                    min(own, other),
                )

    # -- Redis calls -------------------------------------------------------------------------

    def _where(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"Redis at {kwargs['path']}"
        return f"Redis at {kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    def _error(self, error: Exception) -> APIConnectionError:
        reason = type(error).__name__ if not str(error) else str(error)
        return APIConnectionError(
            f"{self._where()} (account {self.name!r}) failed: {reason}", sent=False
        )

    def _new_id(self) -> str:
        return f"{self._id}.{next(self._serial)}"

    def _io_timeout(self) -> float:
        # A share of the client's timeout: an unanswered call is reported as Redis's
        # fault before the create's own deadline (often the same timeout) fires.
        return max(0.05, min(IO_TIMEOUT.get() * IO_SHARE, self.lease))

    async def _bounded(self, call: Coroutine[Any, Any, _T]) -> _T:
        """One Redis call, bounded by the client's timeout (at most a lease).

        redis-py (5.0.1 and later) disconnects a connection whose command was cancelled,
        so a call that timed out leaves no half-read answer in the pool.
        """
        timeout = self._io_timeout()
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            raise APIConnectionError(
                f"{self._where()} (account {self.name!r}) did not answer within {timeout:g} s",
                sent=False,
            ) from None
        except (RedisError, OSError) as error:
            raise self._error(error) from error

    async def _call(self, script: Any, args: list[Any], *extra_keys: str) -> Any:
        common = [self._lease_ms, self._id, self._new_id(), self.max_running or ""]
        return await self._bounded(
            script(keys=[*self._keys, *extra_keys], args=[*common, *args], client=self._redis)
        )

    async def _deliver(self, script: Any, args: list[Any], *extra_keys: str) -> Any:
        """Record that a task exists, retrying for a while when Redis is unreachable.

        The task was created: failing the caller now would make it create again. Returns
        the script's answer, or None when Redis stayed unreachable.
        """
        for attempt in range(CLAIM_LEASES * 3 + 1):
            try:
                return await self._call(script, args, *extra_keys)
            except APIConnectionError as error:
                if attempt == CLAIM_LEASES * 3 or self._closed:
                    logger.warning("recording a created task failed: %s", error)
                    return None
                await asyncio.sleep(self._tick)
        return None

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _complete(self, coro: Coroutine[Any, Any, _T]) -> _T:
        # Runs to the end even if the caller is cancelled meanwhile (the caller still
        # sees its cancellation): a slot given back must reach Redis.
        return await asyncio.shield(self._spawn(coro))

    # -- waking ------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe to the account's channels (raises when Redis is down)."""
        if self._listening is not None and not self._listening.done():
            return
        # One subscriber per account: without the lock, every caller arriving while the
        # first subscribes would open a subscription (and a listening task) of its own.
        async with self._subscribing:
            if self._listening is not None and not self._listening.done():
                return
            pubsub = await self._subscribe()
            self._listening = asyncio.ensure_future(self._read(pubsub))

    async def _subscribe(self) -> Any:
        # Any: redis-py's PubSub is typed in some releases and not in others.
        pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._bounded(pubsub.subscribe(self._freed_channel, self._settled_channel))
        except BaseException:
            await self._close_pubsub(pubsub)
            raise
        return pubsub

    async def _close_pubsub(self, pubsub: Any) -> None:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(pubsub.aclose()), self._io_timeout())

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                try:
                    async for message in pubsub.listen():
                        self._on_message(_text(message["channel"]), _text(message["data"]))
                except (RedisError, OSError) as error:
                    logger.info("%s: %s", self._where(), error)
                await asyncio.sleep(self._tick)
                self._wake_all()  # something may have been missed meanwhile
                await self._close_pubsub(pubsub)
                try:
                    pubsub = await self._subscribe()
                except APIConnectionError as error:
                    logger.info("%s", error)
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        finally:
            await self._close_pubsub(pubsub)

    def _on_message(self, channel: str, data: str) -> None:
        if channel == self._freed_channel:
            if self._waiters:
                self._waiters[0].wake.set()
            self._freed.set()
        else:
            event = self._claim_waits.get(data)
            if event is not None:
                event.set()

    def _wake_all(self) -> None:
        if self._waiters:
            self._waiters[0].wake.set()
        self._freed.set()
        for event in self._claim_waits.values():
            event.set()

    def _note_epoch(self, epoch: str) -> None:
        if self._epoch is not None and epoch != self._epoch and (self._held or self._claims):
            logger.warning("%s lost its data: putting this process's slots back", self._where())
            self._spawn(self._renew(force=True))
        self._epoch = epoch

    # -- slots -------------------------------------------------------------------------------

    async def acquire(self, external_task_id: str, lookup: Lookup) -> AccountSlot:
        self._check_open()
        await self._listen()
        waiter = _Waiter(f"{self._id}:{next(self._serial)}", lookup)
        slot = AccountSlot(external_task_id, token=self._new_id())
        self._waiters.append(waiter)
        self._start_renewing()
        attempt: asyncio.Task[bool] | None = None
        outage = _Outage()
        try:
            first = True
            while True:
                if first or waiter is self._waiters[0]:
                    waiter.wake.clear()
                    attempt = self._spawn(self._take(waiter, slot, queueing=first))
                    try:
                        if await asyncio.shield(attempt):
                            break
                        outage.over()
                    except APIConnectionError:
                        # Its place in the queue is kept by renewals meanwhile.
                        if outage.gives_up(first):
                            raise
                    attempt = None
                    first = False
                try:
                    await asyncio.wait_for(waiter.wake.wait(), self._tick)
                except asyncio.TimeoutError:
                    if waiter is self._waiters[0]:
                        self._spawn(self._reclaim(waiter.lookup))
        except BaseException:
            self._spawn(self._abandon(waiter, slot, attempt))
            raise
        finally:
            self._waiters.remove(waiter)
            if self._waiters:
                self._waiters[0].wake.set()  # the next one of ours may fit too
        self._held[slot.token] = _Held(slot, lookup, time.monotonic())
        self._by_ext[external_task_id] = slot.token
        return slot

    async def _take(self, waiter: _Waiter, slot: AccountSlot, *, queueing: bool) -> bool:
        if queueing:
            async with self._queueing:
                return await self._take(waiter, slot, queueing=False)
        taken, epoch, limit, low, high = await self._call(
            self._acquire_script, [waiter.id, slot.token, slot.external_task_id]
        )
        self._note_epoch(_text(epoch))
        self._note_limit(limit, low, high)
        return bool(taken)

    async def _abandon(
        self, waiter: _Waiter, slot: AccountSlot, attempt: asyncio.Task[bool] | None
    ) -> None:
        if attempt is not None:
            await asyncio.gather(attempt, return_exceptions=True)
        # A take that timed out may still reach Redis later: renewals free it meanwhile.
        self._drops[slot.token] = time.monotonic() + DROP_LEASES * self.lease
        try:
            await self._call(self._abandon_script, [slot.token, waiter.id])
        except APIConnectionError as error:
            logger.info("giving back an unused slot failed (retried at renewals): %s", error)
            self._start_renewing()

    async def created(self, slot: AccountSlot, task: Task) -> None:
        slot.task_id = task.task_id
        slot.creating = False
        held = self._held.get(slot.token)
        if held is not None:
            held.seen = time.monotonic()
            held.maybe_created = False
            if task.is_terminal:
                self._forget(slot.token)
            else:
                self._by_task[task.task_id] = slot.token
        if task.is_terminal:
            self._give_back_later([slot.token, task.task_id, slot.external_task_id])
            return
        if self.max_running is not None:
            # Nothing to write: the lease carries the external id, by which a finished
            # task (or a look-up after its holder died) finds it; the task id is put back
            # with it after Redis lost its data.
            return
        limit = await self._complete(
            self._deliver(self._created_script, [slot.token, task.task_id, "0", "1"])
        )
        self._note_limit(limit)

    async def refused(self, slot: AccountSlot, retry_after: float | None = None) -> None:
        slot.creating = False
        self._forget(slot.token)
        self._freed.clear()
        # Wait for a slot to free anywhere on the account, or (when this process holds
        # no slot, so what fills the account is not ours) a jittered backoff; as
        # InMemoryAccount does. The backoff key lives as long as this wait.
        wait = _protocol.refused_wait(retry_after, ours_running=bool(self._held))
        try:
            _, limit = await self._complete(
                self._call(
                    self._refused_script,
                    [
                        slot.token,
                        "1" if self.max_running is None else "0",
                        math.ceil(wait * 1000),
                    ],
                )
            )
        except APIConnectionError as error:
            logger.info("giving back a refused slot failed (retried at renewals): %s", error)
            self._drop_later(slot.token)
            limit = 0
        self._note_limit(limit)
        with contextlib.suppress(APIConnectionError):
            await self._listen()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._freed.wait(), wait)

    async def release(self, slot: AccountSlot, *, maybe_created: bool = False) -> None:
        held = self._held.get(slot.token)
        if maybe_created and held is not None:
            held.ambiguous()  # kept, and looked up once a request can no longer arrive
            return
        slot.creating = False
        self._forget(slot.token)
        try:
            await self._complete(
                self._call(self._release_script, [slot.token, "", slot.external_task_id])
            )
        except APIConnectionError as error:
            logger.warning("giving a slot back failed (retried at renewals): %s", error)
            self._drop_later(slot.token)

    async def finished(self, task: Task) -> None:
        # Never waits on Redis: the caller has its task, and must get it at once.
        token = self._by_task.get(task.task_id, "")
        if not token and task.external_task_id:
            token = self._by_ext.get(task.external_task_id, "")
        if token:
            self._forget(token)
        if self._closed:
            return
        self._give_back_later([token, task.task_id, task.external_task_id or ""])

    def _give_back_later(self, args: list[str]) -> None:
        self._spawn(self._give_back(args))

    async def _give_back(self, args: list[str]) -> None:
        # Never raises: the caller's task exists (or never will). A slot not given back
        # is freed at later renewals, or by whoever waits once its lease runs out.
        try:
            await self._call(self._release_script, args)
        except APIConnectionError as error:
            logger.warning("giving a slot back failed (retried at renewals): %s", error)
            if args[0]:
                self._drop_later(args[0])

    def _drop_later(self, token: str) -> None:
        self._drops[token] = time.monotonic() + DROP_LEASES * self.lease
        if not self._closed:
            self._start_renewing()

    def _forget(self, token: str) -> None:
        held = self._held.pop(token, None)
        if held is not None:
            if held.slot.task_id is not None:
                self._by_task.pop(held.slot.task_id, None)
            if self._by_ext.get(held.slot.external_task_id) == token:
                del self._by_ext[held.slot.external_task_id]

    # -- renewal and checks ------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self._closed:
            return
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.ensure_future(self._renew_loop())

    async def _renew_loop(self) -> None:
        # Runs while the account is open once it was used: it keeps this process's
        # max_running registered (and so the account's limit the smallest given).
        while not self._closed:
            await asyncio.sleep(self._tick)
            try:
                await self._renew(force=False)
            except APIConnectionError as error:
                logger.warning("renewing slots failed (trying again): %s", error)
            now = time.monotonic()
            for held in list(self._held.values()):
                due = not held.creating and now - held.seen >= CHECK_AFTER
                if due and not held.checking:
                    held.checking = True
                    self._spawn(self._check_own(held))

    async def _renew(self, *, force: bool) -> None:
        now = time.monotonic()
        self._drops = {token: until for token, until in self._drops.items() if until >= now}
        self._dropped_claims = {
            key: until for key, until in self._dropped_claims.items() if until >= now
        }
        held = list(self._held.values())
        document = {
            "f": 1 if force else 0,
            "cm": self._lease_ms * CLAIM_LEASES,
            "l": [[h.slot.token, h.slot.external_task_id, h.slot.task_id or ""] for h in held],
            "w": [waiter.id for waiter in self._waiters],
            "d": list(self._drops),
            "c": [[ext, call] for ext, call in self._claims.items()],
            "x": [[ext, call] for ext, call in self._dropped_claims],
        }
        epoch, gone, lost, limit, low, high = await self._call(
            self._renew_script, [orjson.dumps(document).decode()]
        )
        epoch = _text(epoch)
        if not force and self._epoch is not None and epoch != self._epoch:
            self._epoch = epoch
            logger.warning("%s lost its data: putting this process's slots back", self._where())
            await self._renew(force=True)
            return
        self._epoch = epoch
        self._note_limit(limit, low, high)
        for token in gone:
            self._forget(_text(token))  # freed by whoever saw its task finish
        for ext in lost:
            logger.warning(
                "the claim of external_task_id %s lapsed (this process stalled for longer"
                " than %g leases): another create of it may run",
                _text(ext),
                CLAIM_LEASES,
            )

    async def _check_own(self, held: _Held) -> None:
        try:
            task = await held.lookup(held.slot.external_task_id)
        except Exception as error:  # best effort: try again at a later renewal
            logger.info("account check of %s failed: %s", held.slot.external_task_id, error)
            return
        finally:
            held.checking = False
            held.seen = time.monotonic()
        if held.creating:  # a create started meanwhile (never the case today)
            return
        if task is None or task.is_terminal:
            if held.slot.token in self._held:
                await self.release(held.slot)
        elif held.slot.task_id is None or held.maybe_created:
            held.maybe_created = False
            await self.created(held.slot, task)

    async def _reclaim(self, lookup: Lookup) -> None:
        """Look up the tasks of leases whose holder stopped renewing them."""
        try:
            expired = await self._call(self._expired_script, [16])
        except APIConnectionError as error:
            logger.info("looking for expired slots failed: %s", error)
            return
        for token, doc, expiry in zip(expired[::3], expired[1::3], expired[2::3], strict=True):
            lease = orjson.loads(doc)
            slot = AccountSlot(lease["e"], task_id=lease["t"] or None, token=_text(token))
            try:
                task = await lookup(slot.external_task_id)
            except Exception as error:  # checked again when the lease runs out
                logger.info("account check of %s failed: %s", slot.external_task_id, error)
                continue
            try:
                if task is None or task.is_terminal:
                    logger.info("slot of %s freed: its holder is gone", slot.external_task_id)
                    await self._call(self._release_script, [slot.token, "", "", _text(expiry)])
                elif slot.task_id is None:
                    await self._call(self._created_script, [slot.token, task.task_id, "0", "0"])
            except APIConnectionError as error:
                logger.info("freeing an expired slot failed: %s", error)

    # -- exactly once ------------------------------------------------------------------------

    def _claim_key(self, external_task_id: str) -> str:
        return f"{self._prefix}claim:{external_task_id}"

    async def claim(self, external_task_id: str) -> Claim:
        self._check_open()
        key = self._claim_key(external_task_id)
        event = self._claim_waits.setdefault(external_task_id, asyncio.Event())
        first = True
        outage = _Outage()
        self._claiming[external_task_id] += 1
        try:
            await self._listen()
            self._start_renewing()
            while True:
                event.clear()
                call = self._new_id()
                # No create of this process holds the id: a claim of ours found in Redis
                # was granted to a call that timed out (or a create whose settle was
                # lost; the create layer remembers those itself): take it over.
                adopt = external_task_id not in self._claims
                adopt = adopt and self._claiming[external_task_id] == 1
                try:
                    answer = await self._call(
                        self._claim_script,
                        [
                            external_task_id,
                            self._lease_ms * CLAIM_LEASES,
                            call,
                            "1" if adopt else "0",
                        ],
                        key,
                    )
                except APIConnectionError:
                    # The call may still reach Redis and be granted: drop it then.
                    self._drop_claim_later(external_task_id, call)
                    if outage.gives_up(first):
                        raise
                    answer = [b"down"]
                else:
                    outage.over()
                first = False
                kind = _text(answer[0])
                if kind == "task":
                    return Claim(converter.structure(orjson.loads(answer[1]), Task))
                if kind == "mine":
                    self._note_epoch(_text(answer[1]))
                    self._claims[external_task_id] = call
                    since = int(answer[2])
                    if since < 0:
                        return Claim()
                    logger.info(
                        "external_task_id %s: an earlier create of it may have been sent"
                        " %.1f s ago (%s)",
                        external_task_id,
                        since / 1000,
                        _text(answer[3]),
                    )
                    return Claim(maybe_since=since / 1000)
                if kind == "wait":
                    self._note_epoch(_text(answer[1]))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), min(CLAIM_POLL, self._tick))
        finally:
            self._claiming[external_task_id] -= 1
            if not self._claiming[external_task_id]:
                del self._claiming[external_task_id]
            self._claim_waits.pop(external_task_id, None)

    def _drop_claim_later(self, external_task_id: str, call: str) -> None:
        self._dropped_claims[external_task_id, call] = (
            time.monotonic() + DROP_LEASES * CLAIM_LEASES * self.lease
        )
        self._start_renewing()

    async def settle(
        self, external_task_id: str, task: Task | None, *, maybe_created: bool = False
    ) -> None:
        call = self._claims.get(external_task_id, "")
        document = "" if task is None else orjson.dumps(converter.unstructure(task)).decode()
        args = [external_task_id, document, SETTLED_TTL, "1" if maybe_created else "0", call]
        key = self._claim_key(external_task_id)
        try:
            if task is None and not maybe_created:
                try:
                    await self._complete(self._call(self._settle_script, args, key))
                except APIConnectionError:
                    # Nothing was sent with the claim: renewals drop it, and a next
                    # claim of the id by this process takes it over at once.
                    if call:
                        self._drop_claim_later(external_task_id, call)
                    raise
            else:
                # What happened must be recorded: retried a while when Redis is away.
                await self._complete(self._deliver(self._settle_script, args, key))
        finally:
            if self._claims.get(external_task_id) == call:
                del self._claims[external_task_id]

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RedisAccount is closed")

    async def aclose(self) -> None:
        """Stop renewing and listening; close the Redis client if the account made it.

        Waits (at most ``CLOSE_WAIT`` seconds) for slots being given back in the
        background. Slots still held are not dropped: their leases run out and the tasks
        are looked up by whoever waits next, as after a crash.
        """
        if self._closed:
            return
        self._closed = True
        for task in (self._renewing, self._listening):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._renewing, self._listening) if t is not None),
            return_exceptions=True,
        )
        if self._background:
            _, pending = await asyncio.wait(list(self._background), timeout=CLOSE_WAIT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._own_redis:
            await self._redis.aclose()
