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

How it works (all keys under ``kling:{name}:``; the braces make them one Redis Cluster
hash slot):

- A slot is a *lease*: a hash entry holding its external task id and, once created, its
  task id, with an expiry in a sorted set. Leases are taken and freed by Lua scripts, so
  two processes never take the last slot together. The holder renews its leases every
  ``lease / 3`` seconds; anyone who sees the task finished frees its slot.
- A lease whose holder stopped renewing (a process killed) is not dropped: a waiting
  process looks its task up by external task id and frees the slot only when the task is
  finished or absent; a running one is leased again and looked at later.
- Waiters queue in a sorted set (first come, first served across processes) and wake on a
  pub/sub message when a slot frees, with a re-check every ``lease / 3`` seconds.
- The limit is ``max_running`` when given, or learned from 1303 answers by everyone
  together, exactly as `kling_async.InMemoryAccount` learns it: it starts at 1 and grows
  by one slot per create accepted at the limit (doubling per round of creates) until the
  first 1303, which lowers it at once to the slots held less one and ends that slow
  start; from then on it grows by ``1 / limit`` per create accepted at the limit. The
  limit and the slow-start flag live in Redis, changed only inside Lua scripts.
- ``claim`` takes an external task id with ``SET NX``; ``settle`` stores the created task
  there, so a second create with that id, in any process, gets the first one's task.

When Redis cannot be reached every method raises `kling_async.APIConnectionError` naming
Redis: no task is created without a slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
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

from kling_async._account import (
    CHECK_AFTER,
    REFUSED_WAIT_CAP,
    Account,
    AccountSlot,
    Lookup,
    _Held,
)
from kling_async._config import is_int_in, is_seconds, is_text
from kling_async._converter import converter
from kling_async._models import Task
from kling_async.errors import APIConnectionError, ConfigurationError

__all__ = ["RedisAccount"]

logger = logging.getLogger("kling_async")

_T = TypeVar("_T")

#: How long a settled claim (the created task) is kept for a late duplicate, in seconds.
SETTLED_TTL: Final = 24 * 3600
#: A claim lives this many leases without renewal before another create may take it.
CLAIM_LEASES: Final = 3
#: How often a second claimer looks again when no pub/sub message came, in seconds.
CLAIM_POLL: Final = 0.5
#: The shortest lease accepted, in seconds.
MIN_LEASE: Final = 0.1

# Every script reads the server's clock, so the hosts' clocks never need to agree.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A lease is freed: drop it and its task index; tell whoever waits. Not only queued
# waiters do: a create refused with 1303 waits for a slot to free without being queued,
# and says so in KEYS[7] (publishing only to a non-empty queue left it sleeping beside a
# free slot). With nobody waiting nothing is published: no message per create.
_FREE = """
local function free(id)
  local doc = redis.call('HGET', KEYS[1], id)
  if not doc then return 0 end
  local lease = cjson.decode(doc)
  if lease.t and lease.t ~= '' then redis.call('HDEL', KEYS[3], lease.t) end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if redis.call('ZCARD', KEYS[4]) > 0 or redis.call('EXISTS', KEYS[7]) == 1 then
    redis.call('PUBLISH', KEYS[6], 'free')
  end
  return 1
end
"""

# KEYS: leases expiry tasks queue limit channel backoff waiters ticket epoch
# ARGV: waiter lease_id ext lease_ms max_running candidate_epoch
_ACQUIRE = (
    _NOW
    + """
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now)) do
  redis.call('ZREM', KEYS[4], w)
  redis.call('ZREM', KEYS[8], w)
end
local epoch = redis.call('GET', KEYS[10])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[10], epoch)
end
-- The plan's limit, or the learned one (1 before anything was learned: slow start).
local limit = tonumber(ARGV[5]) or tonumber(redis.call('GET', KEYS[5])) or 1
limit = math.max(1, math.floor(limit))
local held = redis.call('HLEN', KEYS[1])
local room = limit - held
local rank = redis.call('ZRANK', KEYS[4], ARGV[1])
local ahead = rank
if not rank then ahead = redis.call('ZCARD', KEYS[4]) end
if ahead < room then
  redis.call('HSET', KEYS[1], ARGV[2], cjson.encode({e = ARGV[3], t = ''}))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[8], ARGV[1])
  return {1, epoch, limit}
end
if not rank then
  redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[9]), ARGV[1])
end
redis.call('ZADD', KEYS[8], now + tonumber(ARGV[4]), ARGV[1])
return {0, epoch, limit}
"""
)

# KEYS: leases expiry tasks queue limit channel backoff steady
# ARGV: lease_id task_id terminal learn
# Returns the learned limit (0 when nothing was learned here).
# Learning, as TCP learns a window: while `steady` is unset (no 1303 seen yet) the limit
# grows by one slot per create accepted at the limit (doubling per round of creates);
# after that by 1/limit. Only creates accepted *at* the limit count: room nobody asked
# for proves nothing.
_CREATED = (
    _FREE
    + """
local function learned()
  if ARGV[4] ~= '1' then return 0 end
  local limit = tonumber(redis.call('GET', KEYS[5])) or 1
  local whole = math.max(1, math.floor(limit))
  if redis.call('HLEN', KEYS[1]) < whole then return whole end
  local raised = limit + 1
  if redis.call('EXISTS', KEYS[8]) == 1 then raised = limit + 1 / limit end
  redis.call('SET', KEYS[5], string.format('%.17g', raised))
  if math.floor(raised) > whole and redis.call('ZCARD', KEYS[4]) > 0 then
    redis.call('PUBLISH', KEYS[6], 'free')
  end
  return math.max(1, math.floor(raised))
end
local doc = redis.call('HGET', KEYS[1], ARGV[1])
if not doc then return 0 end
if ARGV[3] == '1' then
  free(ARGV[1])
  return 0
end
local lease = cjson.decode(doc)
lease.t = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(lease))
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
return learned()
"""
)

# KEYS: leases expiry tasks queue limit channel backoff; ARGV: lease_id task_id
_RELEASE = (
    _FREE
    + """
local id = ARGV[1]
if id == '' then
  id = redis.call('HGET', KEYS[3], ARGV[2])
  if not id then return 0 end
end
return free(id)
"""
)

# KEYS: leases expiry tasks queue limit channel backoff steady; ARGV: lease_id learn wait_ms
# Returns how many slots are still held, and the learned limit (0 when not learned).
# A 1303 lowers the limit at once to the slots held less the refused one (every other
# slot is a task the service accepted) and ends the slow start. The refused create then
# waits (up to wait_ms) for a slot to free: `backoff` asks `free` to announce it.
_REFUSED = (
    _FREE
    + """
local limit = 0
if ARGV[2] == '1' then
  limit = math.max(1, redis.call('HLEN', KEYS[1]) - 1)
  redis.call('SET', KEYS[5], limit)
  redis.call('SET', KEYS[8], '1')
end
if redis.call('PTTL', KEYS[7]) < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[7], '1', 'PX', ARGV[3])
end
free(ARGV[1])
return {redis.call('HLEN', KEYS[1]), limit}
"""
)

# KEYS: leases expiry tasks queue limit channel backoff waiters; ARGV: lease_id waiter
# A cancelled acquire: drop its lease if the take got through, and its queue place.
_ABANDON = (
    _FREE
    + """
redis.call('ZREM', KEYS[8], ARGV[2])
local was_queued = redis.call('ZREM', KEYS[4], ARGV[2])
if free(ARGV[1]) == 0 and was_queued == 1 and redis.call('ZCARD', KEYS[4]) > 0 then
  redis.call('PUBLISH', KEYS[6], 'free')
end
return 1
"""
)

# KEYS: leases expiry; ARGV: lease_ms max
# Leases whose holder stopped renewing, leased again to the caller for a look-up.
_EXPIRED = (
    _NOW
    + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[2])) do
  local doc = redis.call('HGET', KEYS[1], id)
  if doc then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    table.insert(out, id)
    table.insert(out, doc)
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""
)

# KEYS: leases expiry tasks waiters epoch, then claim keys
# ARGV: lease_ms candidate_epoch force owner claim_ms n_leases, then (id ext task) per
#       lease, then the waiter ids.
# Renews what this process holds. After Redis lost its data (a restart without
# persistence: the epoch key is gone or new), `force` puts the leases and claims back.
_RENEW = (
    _NOW
    + """
local lease_ms = tonumber(ARGV[1])
local force = ARGV[3] == '1'
local epoch = redis.call('GET', KEYS[5])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[5], epoch)
end
local gone = {}
local n = tonumber(ARGV[6])
for i = 0, n - 1 do
  local id, ext, task = ARGV[7 + 3 * i], ARGV[8 + 3 * i], ARGV[9 + 3 * i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZADD', KEYS[2], now + lease_ms, id)
  elseif force then
    redis.call('HSET', KEYS[1], id, cjson.encode({e = ext, t = task}))
    redis.call('ZADD', KEYS[2], now + lease_ms, id)
    if task ~= '' then redis.call('HSET', KEYS[3], task, id) end
  else
    table.insert(gone, id)
  end
end
for i = 7 + 3 * n, #ARGV do
  redis.call('ZADD', KEYS[4], 'XX', now + lease_ms, ARGV[i])
end
for i = 6, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[4] then
    redis.call('PEXPIRE', KEYS[i], ARGV[5])
  elseif force and not holder then
    redis.call('SET', KEYS[i], ARGV[4], 'PX', ARGV[5])
  end
end
return {epoch, gone}
"""
)

# KEYS: claim channel; ARGV: owner task_json settled_ttl_s
_SETTLE = """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
elseif redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', KEYS[2], KEYS[1])
return 1
"""


@attrs.define(eq=False)
class _Waiter:
    id: str
    lookup: Lookup
    wake: asyncio.Event = attrs.field(factory=asyncio.Event)


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
            is learned from 1303 answers by everyone on the account.
        lease: seconds a slot outlives its holder's last renewal (renewed every
            ``lease / 3``). Longer rides out longer pauses (a stalled event loop, a
            Redis fail-over); shorter frees a killed process's slots sooner.

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
        self._tick = self.lease / 3
        self._id = uuid.uuid4().hex
        prefix = f"kling:{{{name}}}:"
        self._prefix = prefix
        self._keys = [
            prefix + "leases",
            prefix + "expiry",
            prefix + "tasks",
            prefix + "queue",
            prefix + "limit",
            prefix + "freed",
            # Exists while a create refused with 1303 waits for a slot to free.
            prefix + "backoff",
        ]
        self._waiters_key = prefix + "waiters"
        self._ticket_key = prefix + "ticket"
        self._epoch_key = prefix + "epoch"
        # Set by the first 1303: the learned limit's slow start is over.
        self._learn_keys = [*self._keys, prefix + "steady"]
        self._settled_channel = prefix + "settled"
        register = self._redis.register_script
        self._acquire_script = register(_ACQUIRE)
        self._created_script = register(_CREATED)
        self._release_script = register(_RELEASE)
        self._refused_script = register(_REFUSED)
        self._abandon_script = register(_ABANDON)
        self._expired_script = register(_EXPIRED)
        self._renew_script = register(_RENEW)
        self._settle_script = register(_SETTLE)
        self._epoch: str | None = None
        self._limit = max_running or 1
        self._held: dict[str, _Held] = {}
        self._by_task: dict[str, str] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # A waiter's first take (which queues it in Redis) goes through this lock, so the
        # Redis queue holds this process's waiters in the order of `_waiters`: only the
        # local head tries again, and it must be the first of ours in Redis too.
        self._queueing = asyncio.Lock()
        self._claims: set[str] = set()
        self._claim_waits: dict[str, asyncio.Event] = {}
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
        """How many slots may be taken: `max_running`, or the learned limit as this
        process last saw it in Redis (other processes may have moved it since)."""
        return self._limit

    def _note_limit(self, limit: object) -> None:
        if self.max_running is None and isinstance(limit, int) and limit >= 1:
            self._limit = limit

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

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args, client=self._redis)
        except (RedisError, OSError) as error:
            raise self._error(error) from error

    async def _deliver(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Record that a task exists, retrying for a while when Redis is unreachable.

        The task was created: failing the caller now would make it create again. Returns
        the script's answer, or None when Redis stayed unreachable.
        """
        for attempt in range(CLAIM_LEASES * 3 + 1):
            try:
                return await self._call(script, keys, args)
            except APIConnectionError as error:
                if attempt == CLAIM_LEASES * 3:
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
            # Any: redis-py's PubSub is typed in some releases and not in others.
            pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys[5], self._settled_channel)
            except (RedisError, OSError) as error:
                await pubsub.aclose()
                raise self._error(error) from error
            self._listening = asyncio.ensure_future(self._read(pubsub))

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
                try:
                    await pubsub.aclose()
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(self._keys[5], self._settled_channel)
                except (RedisError, OSError) as error:
                    logger.info("%s: %s", self._where(), error)
        finally:
            await asyncio.shield(pubsub.aclose())

    def _on_message(self, channel: str, data: str) -> None:
        if channel == self._keys[5]:
            if self._waiters:
                self._waiters[0].wake.set()
            self._freed.set()
        else:
            event = self._claim_waits.get(data[len(self._prefix) + len("claim:") :])
            if event is not None:
                event.set()

    def _wake_all(self) -> None:
        if self._waiters:
            self._waiters[0].wake.set()
        self._freed.set()
        for event in self._claim_waits.values():
            event.set()

    # -- slots -------------------------------------------------------------------------------

    async def acquire(self, external_task_id: str, lookup: Lookup) -> AccountSlot:
        self._check_open()
        await self._listen()
        waiter = _Waiter(f"{self._id}:{uuid.uuid4().hex}", lookup)
        slot = AccountSlot(external_task_id, token=uuid.uuid4().hex)
        self._waiters.append(waiter)
        self._start_renewing()
        attempt: asyncio.Task[bool] | None = None
        down_since: float | None = None
        try:
            first = True
            while True:
                if first or waiter is self._waiters[0]:
                    waiter.wake.clear()
                    attempt = self._spawn(self._take(waiter, slot, queueing=first))
                    try:
                        if await asyncio.shield(attempt):
                            break
                        down_since = None
                    except APIConnectionError:
                        # Once queued, ride out a short outage (a Redis restart).
                        if first:
                            raise
                        now = time.monotonic()
                        down_since = down_since or now
                        if now - down_since > self.lease:
                            raise
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
        return slot

    async def _take(self, waiter: _Waiter, slot: AccountSlot, *, queueing: bool) -> bool:
        if queueing:
            async with self._queueing:
                return await self._take(waiter, slot, queueing=False)
        taken, epoch, limit = await self._call(
            self._acquire_script,
            [*self._keys, self._waiters_key, self._ticket_key, self._epoch_key],
            [
                waiter.id,
                slot.token,
                slot.external_task_id,
                int(self.lease * 1000),
                self.max_running or "",
                uuid.uuid4().hex,
            ],
        )
        self._note_epoch(_text(epoch))
        self._note_limit(limit)
        return bool(taken)

    async def _abandon(
        self, waiter: _Waiter, slot: AccountSlot, attempt: asyncio.Task[bool] | None
    ) -> None:
        if attempt is not None:
            await asyncio.gather(attempt, return_exceptions=True)
        try:
            await self._call(
                self._abandon_script,
                [*self._keys, self._waiters_key],
                [slot.token, waiter.id],
            )
        except APIConnectionError as error:
            # The lease (if the take got through) expires and is reclaimed by look-up.
            logger.info("giving back an unused slot failed: %s", error)

    def _note_epoch(self, epoch: str) -> None:
        if self._epoch is not None and epoch != self._epoch and self._held:
            logger.warning("%s lost its data: putting this process's slots back", self._where())
            self._spawn(self._renew(force=True))
        self._epoch = epoch

    async def created(self, slot: AccountSlot, task: Task) -> None:
        slot.task_id = task.task_id
        held = self._held.get(slot.token)
        if held is not None:
            held.seen = time.monotonic()
            held.maybe_created = False
            if task.is_terminal:
                self._forget(slot.token)
            else:
                self._by_task[task.task_id] = slot.token
        limit = await self._complete(
            self._deliver(
                self._created_script,
                self._learn_keys,
                [
                    slot.token,
                    task.task_id,
                    "1" if task.is_terminal else "0",
                    "1" if self.max_running is None else "0",
                ],
            )
        )
        self._note_limit(limit)

    async def refused(self, slot: AccountSlot, retry_after: float | None = None) -> None:
        self._forget(slot.token)
        self._freed.clear()
        longest = retry_after or REFUSED_WAIT_CAP
        held, limit = await self._complete(
            self._call(
                self._refused_script,
                self._learn_keys,
                [
                    slot.token,
                    "1" if self.max_running is None else "0",
                    math.ceil(longest * 1000),
                ],
            )
        )
        self._note_limit(limit)
        await self._listen()
        # Wait for a slot to free anywhere on the account, or (when the account holds no
        # slot, so what fills it is not ours) a jittered backoff; as InMemoryAccount does.
        wait = retry_after or random.uniform(1.0, REFUSED_WAIT_CAP if not held else 5.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._freed.wait(), wait)

    async def release(self, slot: AccountSlot, *, maybe_created: bool = False) -> None:
        held = self._held.get(slot.token)
        if maybe_created and held is not None:
            held.maybe_created = True
            held.seen = 0.0  # look it up at the next renewal
            return
        self._forget(slot.token)
        await self._give_back([slot.token, ""])

    async def finished(self, task: Task) -> None:
        token = self._by_task.get(task.task_id, "")
        if token:
            self._forget(token)
        await self._give_back([token, task.task_id])

    async def _give_back(self, args: list[str]) -> None:
        # Never raises: the caller's task exists (or never will), and an error here would
        # make it look failed, so that a job queue would run it again and create a second
        # task. A slot not given back is no longer renewed: its lease runs out and whoever
        # waits next frees it once its task is looked up and found finished or absent.
        try:
            await self._complete(self._call(self._release_script, self._keys, args))
        except APIConnectionError as error:
            logger.warning(
                "giving a slot back failed (it is freed when its lease runs out): %s", error
            )

    def _forget(self, token: str) -> None:
        held = self._held.pop(token, None)
        if held is not None and held.slot.task_id is not None:
            self._by_task.pop(held.slot.task_id, None)

    # -- renewal and checks ------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.ensure_future(self._renew_loop())

    async def _renew_loop(self) -> None:
        while self._held or self._waiters or self._claims:
            await asyncio.sleep(self._tick)
            try:
                await self._renew(force=False)
            except APIConnectionError as error:
                logger.warning("renewing slots failed (trying again): %s", error)
            now = time.monotonic()
            for held in list(self._held.values()):
                due = held.maybe_created or now - held.seen >= CHECK_AFTER
                if due and not held.checking:
                    held.checking = True
                    self._spawn(self._check_own(held))

    async def _renew(self, *, force: bool) -> None:
        held = list(self._held.values())
        args: list[Any] = [
            int(self.lease * 1000),
            uuid.uuid4().hex,
            "1" if force else "0",
            self._id,
            int(self.lease * 1000 * CLAIM_LEASES),
            len(held),
        ]
        for each in held:
            args += [each.slot.token, each.slot.external_task_id, each.slot.task_id or ""]
        args += [waiter.id for waiter in self._waiters]
        claims = list(self._claims)
        keys = [*self._keys[:3], self._waiters_key, self._epoch_key]
        keys += [self._claim_key(claim) for claim in claims]
        epoch, gone = await self._call(self._renew_script, keys, args)
        epoch = _text(epoch)
        if not force and self._epoch is not None and epoch != self._epoch:
            self._epoch = epoch
            logger.warning("%s lost its data: putting this process's slots back", self._where())
            await self._renew(force=True)
            return
        self._epoch = epoch
        for token in gone:
            self._forget(_text(token))  # freed by whoever saw its task finish

    async def _check_own(self, held: _Held) -> None:
        try:
            task = await held.lookup(held.slot.external_task_id)
        except Exception as error:  # best effort: try again at a later renewal
            logger.info("account check of %s failed: %s", held.slot.external_task_id, error)
            return
        finally:
            held.checking = False
            held.seen = time.monotonic()
        if task is None or task.is_terminal:
            if held.slot.token in self._held:
                await self.release(held.slot)
        elif held.slot.task_id is None or held.maybe_created:
            held.maybe_created = False
            await self.created(held.slot, task)

    async def _reclaim(self, lookup: Lookup) -> None:
        """Look up the tasks of leases whose holder stopped renewing them."""
        try:
            expired = await self._call(
                self._expired_script, self._keys[:2], [int(self.lease * 1000), 16]
            )
        except APIConnectionError as error:
            logger.info("looking for expired slots failed: %s", error)
            return
        for token, doc in zip(expired[::2], expired[1::2], strict=True):
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
                    await self._call(self._release_script, self._keys, [slot.token, ""])
                elif slot.task_id is None:
                    await self._call(
                        self._created_script,
                        self._learn_keys,
                        [slot.token, task.task_id, "0", "0"],
                    )
            except APIConnectionError as error:
                logger.info("freeing an expired slot failed: %s", error)

    # -- exactly once ------------------------------------------------------------------------

    def _claim_key(self, external_task_id: str) -> str:
        return f"{self._prefix}claim:{external_task_id}"

    async def claim(self, external_task_id: str) -> Task | None:
        self._check_open()
        key = self._claim_key(external_task_id)
        event = self._claim_waits.setdefault(external_task_id, asyncio.Event())
        try:
            await self._listen()
            while True:
                event.clear()
                try:
                    taken = await self._redis.set(
                        key, self._id, nx=True, px=int(self.lease * 1000 * CLAIM_LEASES)
                    )
                    value = None if taken else await self._redis.get(key)
                except (RedisError, OSError) as error:
                    raise self._error(error) from error
                if taken:
                    self._claims.add(external_task_id)
                    self._start_renewing()
                    return None
                if value is not None and _text(value).startswith("{"):
                    return converter.structure(orjson.loads(value), Task)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), CLAIM_POLL)
        finally:
            self._claim_waits.pop(external_task_id, None)

    async def settle(self, external_task_id: str, task: Task | None) -> None:
        self._claims.discard(external_task_id)
        document = "" if task is None else orjson.dumps(converter.unstructure(task)).decode()
        keys = [self._claim_key(external_task_id), self._settled_channel]
        args = [self._id, document, SETTLED_TTL]
        if task is None:
            await self._complete(self._call(self._settle_script, keys, args))
        else:
            await self._complete(self._deliver(self._settle_script, keys, args))

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RedisAccount is closed")

    async def aclose(self) -> None:
        """Stop renewing and listening; close the Redis client if the account made it.

        Slots still held are not dropped: their leases run out and the tasks are looked
        up by whoever waits next, as after a crash.
        """
        if self._closed:
            return
        self._closed = True
        for task in (self._renewing, self._listening):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._renewing, self._listening) if t is not None),
            *self._background,
            return_exceptions=True,
        )
        if self._own_redis:
            await self._redis.aclose()
