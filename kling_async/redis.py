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
  or an eviction on a long-running Redis is taken for a first use). Records of ended creates
  (tasks, ``maybe`` records) lost with the data are lost.
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
    IO_TIMEOUT,
    REFUSED_WAIT_CAP,
    Account,
    AccountSlot,
    Claim,
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

# The keys every script gets, in this order (after the prefix).
_KEY_NAMES: Final = (
    "leases",  # 1  hash: lease id -> {e: external id, t: task id, o: process}
    "expiry",  # 2  zset: lease id -> logical expiry (ms)
    "tasks",  # 3  hash: task id -> lease id
    "exts",  # 4  hash: external id -> lease id
    "queue",  # 5  zset: waiter -> ticket
    "limit",  # 6  the learned limit
    "freed",  # 7  channel: a slot freed
    "backoff",  # 8  exists while a create refused with 1303 waits for a slot
    "waiters",  # 9  zset: waiter -> logical expiry
    "ticket",  # 10 counter of queue tickets
    "epoch",  # 11 changes when Redis lost the data
    "steady",  # 12 set by the first 1303: the learned limit's slow start is over
    "clock",  # 13 hash: t (Redis TIME, ms), c (logical ms), k (cap), q (quarantine end)
    "procs",  # 14 zset: process -> logical expiry
    "given",  # 15 hash: process -> max_running ('' when learned)
    "claims",  # 16 hash: external id -> "process|expiry|renewed|call" (logical ms)
    "settled",  # 17 channel: a claim ended
)

# ARGV 1-4 of every script: lease_ms, process id, candidate epoch, max_running ('' if none).
# Reads Redis's TIME and advances the logical clock by the time since the last script,
# at most a third of a lease (the smallest lease any process passed).
_PRELUDE = """
local t = redis.call('TIME')
local wall = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local LEASE = tonumber(ARGV[1])
local ME = ARGV[2]
local c = redis.call('HMGET', KEYS[13], 't', 'c', 'k', 'q', 'l')
local cap = math.min(tonumber(c[3]) or LEASE, math.floor(LEASE / 3))
local now = tonumber(c[2]) or 0
if c[1] then now = now + math.max(0, math.min(wall - tonumber(c[1]), cap)) end
local calm = tonumber(c[4]) or 0
local lost_at = tonumber(c[5]) or -1e15
local epoch = redis.call('GET', KEYS[11])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[11], epoch)
  -- Redis restarted less than a lease ago: it may have lost live holders' slots and
  -- claims. Give them one lease of answering time to put them back (their renewals,
  -- every third of a lease, see the new epoch) before anything is handed out. Up for
  -- longer with no epoch, nobody has renewed anything here for a lease: a new name.
  local info = redis.pcall('INFO', 'server')
  local up = type(info) == 'string' and tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
  if not up or up * 1000 < LEASE then
    calm = now + LEASE
    lost_at = now
  end
end
redis.call('HSET', KEYS[13], 't', wall, 'c', now, 'k', cap, 'q', calm, 'l', lost_at)
local quiet = now < calm

local function register()
  redis.call('ZADD', KEYS[14], now + LEASE, ME)
  redis.call('HSET', KEYS[15], ME, ARGV[4])
end

-- The smallest and largest max_running given by a live process (false: none given).
local function given()
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[14], '-inf', '(' .. now)) do
    redis.call('ZREM', KEYS[14], p)
    redis.call('HDEL', KEYS[15], p)
  end
  local low, high = false, false
  for _, v in ipairs(redis.call('HVALS', KEYS[15])) do
    local n = tonumber(v)
    if n then
      if not low or n < low then low = n end
      if not high or n > high then high = n end
    end
  end
  return low, high
end

-- A lease is freed: drop it and its indexes; tell whoever waits. Not only queued
-- waiters do: a create refused with 1303 waits without being queued and says so in
-- `backoff`. With nobody waiting nothing is published: no message per create.
local function free(id)
  local doc = redis.call('HGET', KEYS[1], id)
  if not doc then return 0 end
  local lease = cjson.decode(doc)
  if lease.t and lease.t ~= '' and redis.call('HGET', KEYS[3], lease.t) == id then
    redis.call('HDEL', KEYS[3], lease.t)
  end
  if lease.e and redis.call('HGET', KEYS[4], lease.e) == id then
    redis.call('HDEL', KEYS[4], lease.e)
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if redis.call('ZCARD', KEYS[5]) > 0 or redis.call('EXISTS', KEYS[8]) == 1 then
    redis.call('PUBLISH', KEYS[7], 'free')
  end
  return 1
end
"""

# ARGV 5-7: waiter lease_id ext. Returns {taken, epoch, limit, lowest given, highest}.
_ACQUIRE = (
    _PRELUDE
    + """
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', '(' .. now)) do
  redis.call('ZREM', KEYS[5], w)
  redis.call('ZREM', KEYS[9], w)
end
register()
local low, high = given()
-- The plan's limit, or the learned one (1 before anything was learned: slow start).
local limit = low or tonumber(redis.call('GET', KEYS[6])) or 1
limit = math.max(1, math.floor(limit))
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 1 then
  -- An earlier take of this very slot timed out at the caller but got through: its own.
  redis.call('ZADD', KEYS[2], now + LEASE, ARGV[6])
  redis.call('ZREM', KEYS[5], ARGV[5])
  redis.call('ZREM', KEYS[9], ARGV[5])
  return {1, epoch, limit, low or 0, high or 0}
end
local room = limit - redis.call('HLEN', KEYS[1])
local rank = redis.call('ZRANK', KEYS[5], ARGV[5])
local ahead
if rank then
  -- Only other processes' waiters count: ours behind us locally try only when they
  -- lead our local queue, so waiting for them would stall us all.
  ahead = 0
  if rank > 0 then
    local mine = ME .. ':'
    for _, w in ipairs(redis.call('ZRANGE', KEYS[5], 0, rank - 1)) do
      if string.sub(w, 1, #mine) ~= mine then ahead = ahead + 1 end
    end
  end
else
  ahead = redis.call('ZCARD', KEYS[5])
end
if ahead < room and not quiet then
  redis.call('HSET', KEYS[1], ARGV[6], cjson.encode({e = ARGV[7], t = '', o = ME}))
  redis.call('ZADD', KEYS[2], now + LEASE, ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[7], ARGV[6])
  redis.call('ZREM', KEYS[5], ARGV[5])
  redis.call('ZREM', KEYS[9], ARGV[5])
  return {1, epoch, limit, low or 0, high or 0}
end
if not rank then
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[10]), ARGV[5])
end
redis.call('ZADD', KEYS[9], now + LEASE, ARGV[5])
return {0, epoch, limit, low or 0, high or 0}
"""
)

# ARGV 5-8: lease_id task_id terminal learn. Returns the learned limit (0: not learned).
# Learning, as TCP learns a window: while `steady` is unset (no 1303 seen yet) the limit
# grows by one slot per create accepted at the limit (doubling per round of creates);
# after that by 1/limit. Only creates accepted *at* the limit count: room nobody asked
# for proves nothing.
_CREATED = (
    _PRELUDE
    + """
local function learned()
  if ARGV[8] ~= '1' then return 0 end
  local limit = tonumber(redis.call('GET', KEYS[6])) or 1
  local whole = math.max(1, math.floor(limit))
  if redis.call('HLEN', KEYS[1]) < whole then return whole end
  local raised = limit + 1
  if redis.call('EXISTS', KEYS[12]) == 1 then raised = limit + 1 / limit end
  redis.call('SET', KEYS[6], string.format('%.17g', raised))
  if math.floor(raised) > whole and redis.call('ZCARD', KEYS[5]) > 0 then
    redis.call('PUBLISH', KEYS[7], 'free')
  end
  return math.max(1, math.floor(raised))
end
local doc = redis.call('HGET', KEYS[1], ARGV[5])
if not doc then return 0 end
if ARGV[7] == '1' then
  free(ARGV[5])
  return 0
end
local lease = cjson.decode(doc)
lease.t = ARGV[6]
redis.call('HSET', KEYS[1], ARGV[5], cjson.encode(lease))
redis.call('HSET', KEYS[3], ARGV[6], ARGV[5])
return learned()
"""
)

# ARGV 5-8: lease_id task_id ext expiry: the lease by its id, else by task id, else by
# ext; with `expiry`, only while the lease's expiry is still that (a look-up's re-lease:
# its holder renewing it meanwhile proves it alive).
_RELEASE = (
    _PRELUDE
    + """
local id = ARGV[5]
if id == '' and ARGV[6] ~= '' then id = redis.call('HGET', KEYS[3], ARGV[6]) end
if (not id or id == '') and ARGV[7] ~= '' then id = redis.call('HGET', KEYS[4], ARGV[7]) end
if not id or id == '' then return 0 end
if ARGV[8] and ARGV[8] ~= '' and redis.call('ZSCORE', KEYS[2], id) ~= ARGV[8] then return 0 end
return free(id)
"""
)

# ARGV 5-7: lease_id learn wait_ms. Returns {slots still held, learned limit (0: not)}.
# A 1303 lowers the limit at once to the slots held less the refused one (every other
# slot is a task the service accepted) and ends the slow start. The refused create then
# waits (up to wait_ms) for a slot to free: `backoff` asks `free` to announce it.
_REFUSED = (
    _PRELUDE
    + """
local limit = 0
if ARGV[6] == '1' then
  limit = math.max(1, redis.call('HLEN', KEYS[1]) - 1)
  redis.call('SET', KEYS[6], limit)
  redis.call('SET', KEYS[12], '1')
end
if redis.call('PTTL', KEYS[8]) < tonumber(ARGV[7]) then
  redis.call('SET', KEYS[8], '1', 'PX', ARGV[7])
end
free(ARGV[5])
return {redis.call('HLEN', KEYS[1]), limit}
"""
)

# ARGV 5-6: lease_id waiter. A cancelled acquire: drop its lease if the take got through,
# and its queue place.
_ABANDON = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[9], ARGV[6])
local was_queued = redis.call('ZREM', KEYS[5], ARGV[6])
if free(ARGV[5]) == 0 and was_queued == 1 and redis.call('ZCARD', KEYS[5]) > 0 then
  redis.call('PUBLISH', KEYS[7], 'free')
end
return 1
"""
)

# ARGV 5: max. Leases whose holder stopped renewing them for a lease of answering time,
# leased again to the caller for a look-up. Never during the quarantine.
_EXPIRED = (
    _PRELUDE
    + """
local out = {}
if quiet then return out end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, ARGV[5])
for _, id in ipairs(due) do
  local doc = redis.call('HGET', KEYS[1], id)
  if doc then
    redis.call('ZADD', KEYS[2], now + LEASE, id)
    table.insert(out, id)
    table.insert(out, doc)
    table.insert(out, redis.call('ZSCORE', KEYS[2], id))
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""
)

# ARGV 5: JSON {f: force, cm: claim_ms, l: [[id, ext, task]], w: [waiters],
#   d: [lease ids to free], c: [[ext, call]] claims held, x: [[ext, call]] claims to drop
#   (granted to calls that timed out)}.
# Renews what this process holds and registers it. After Redis lost its data (the epoch
# changed), `force` puts the leases, claims and queue places (in this process's order)
# back. Returns {epoch, gone leases, lost claims, limit, low, high}.
_RENEW = (
    _PRELUDE
    + """
local a = cjson.decode(ARGV[5])
local force = a.f == 1
register()
local gone, lost = {}, {}
for _, l in ipairs(a.l) do
  local id, ext, task = l[1], l[2], l[3]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZADD', KEYS[2], now + LEASE, id)
  elseif force then
    redis.call('HSET', KEYS[1], id, cjson.encode({e = ext, t = task, o = ME}))
    redis.call('ZADD', KEYS[2], now + LEASE, id)
    redis.call('HSET', KEYS[4], ext, id)
    if task ~= '' then redis.call('HSET', KEYS[3], task, id) end
  else
    table.insert(gone, id)
  end
end
for _, w in ipairs(a.w) do
  if force and not redis.call('ZSCORE', KEYS[5], w) then
    redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[10]), w)
    redis.call('ZADD', KEYS[9], now + LEASE, w)
  else
    -- A place lost otherwise is taken anew by the waiter's own next take (a waiter
    -- whose take just went through must not be queued again here).
    redis.call('ZADD', KEYS[9], 'XX', now + LEASE, w)
  end
end
for _, id in ipairs(a.d) do free(id) end
for _, c in ipairs(a.c) do
  local v = redis.call('HGET', KEYS[16], c[1])
  if (v and string.match(v, '|([^|]*)$') == c[2]) or (not v and force) then
    redis.call('HSET', KEYS[16], c[1], ME .. '|' .. (now + a.cm) .. '|' .. now .. '|' .. c[2])
  else
    table.insert(lost, c[1])
  end
end
for _, c in ipairs(a.x) do
  local v = redis.call('HGET', KEYS[16], c[1])
  if v and string.match(v, '|([^|]*)$') == c[2] then redis.call('HDEL', KEYS[16], c[1]) end
end
local low, high = given()
local limit = low or tonumber(redis.call('GET', KEYS[6])) or 1
return {epoch, gone, lost, math.max(1, math.floor(limit)), low or 0, high or 0}
"""
)

# Within CLAIM_LEASES + 1 leases of Redis losing its data (or of a name's first use: the
# same to Redis), a claim with nothing known against it says how long ago that was.
# KEYS[18]: the id's settled record. ARGV 5-8: ext claim_ms call adopt ('1': no create of
# this process holds the id, so a claim of this process found here was granted to a call
# that timed out or a create whose settle was lost: the process takes it over).
# Returns {'task', doc} | {'wait', epoch} | {'mine', epoch, maybe_since_ms (-1: none), why}.
_CLAIM = (
    _PRELUDE
    + """
local settled = redis.call('GET', KEYS[18])
if settled and string.sub(settled, 1, 1) == '{' then return {'task', settled} end
local since, why = -1, ''
local v = redis.call('HGET', KEYS[16], ARGV[5])
if v then
  local owner, expiry, renewed = string.match(v, '^([^|]*)|([^|]*)|([^|]*)|')
  if owner == ME and ARGV[8] == '1' then
    since = -1
  elseif tonumber(expiry) > now then
    return {'wait', epoch}
  else
    since = now - tonumber(renewed)  -- its holder stopped renewing: it may have sent
    why = 'its claimer stopped renewing'
  end
end
if quiet then return {'wait', epoch} end
if settled and string.sub(settled, 1, 2) == 'm:' then
  since = math.max(since, wall - tonumber(string.sub(settled, 3)))
  why = 'it ended ambiguously'
elseif not v and not settled and now - lost_at < tonumber(ARGV[6]) + LEASE then
  -- Soon after Redis lost its data: a claim of a holder that died just before may have
  -- been lost with it (live holders put theirs back during the quarantine).
  since = now - lost_at
  why = 'Redis lost its data since'
end
local claim = ME .. '|' .. (now + tonumber(ARGV[6])) .. '|' .. now .. '|' .. ARGV[7]
redis.call('HSET', KEYS[16], ARGV[5], claim)
return {'mine', epoch, since, why}
"""
)

# KEYS[18]: the id's settled record. ARGV 5-9: ext task_json settled_ttl_s maybe call.
_SETTLE = (
    _PRELUDE
    + """
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[18], ARGV[6], 'EX', ARGV[7])
elseif ARGV[8] == '1' then
  redis.call('SET', KEYS[18], 'm:' .. wall, 'EX', ARGV[7])
end
local v = redis.call('HGET', KEYS[16], ARGV[5])
if v and string.match(v, '|([^|]*)$') == ARGV[9] then redis.call('HDEL', KEYS[16], ARGV[5]) end
redis.call('PUBLISH', KEYS[17], ARGV[5])
return 1
"""
)


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
        prefix = f"kling:{{{name}}}:"
        self._prefix = prefix
        self._keys = [prefix + key for key in _KEY_NAMES]
        self._freed_channel = self._keys[6]
        self._settled_channel = self._keys[16]
        register = self._redis.register_script
        self._acquire_script = register(_ACQUIRE)
        self._created_script = register(_CREATED)
        self._release_script = register(_RELEASE)
        self._refused_script = register(_REFUSED)
        self._abandon_script = register(_ABANDON)
        self._expired_script = register(_EXPIRED)
        self._renew_script = register(_RENEW)
        self._claim_script = register(_CLAIM)
        self._settle_script = register(_SETTLE)
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
        common = [self._lease_ms, self._id, uuid.uuid4().hex, self.max_running or ""]
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
                        # A new create fails at once; one already queued rides out an
                        # outage (a pause, a restart): its place is kept by renewals.
                        if first:
                            raise
                        now = time.monotonic()
                        down_since = down_since or now
                        if now - down_since > OUTAGE_WAIT:
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
        longest = retry_after or REFUSED_WAIT_CAP
        try:
            held, limit = await self._complete(
                self._call(
                    self._refused_script,
                    [
                        slot.token,
                        "1" if self.max_running is None else "0",
                        math.ceil(longest * 1000),
                    ],
                )
            )
        except APIConnectionError as error:
            logger.info("giving back a refused slot failed (retried at renewals): %s", error)
            self._drop_later(slot.token)
            held, limit = 1, 0
        self._note_limit(limit)
        with contextlib.suppress(APIConnectionError):
            await self._listen()
        # Wait for a slot to free anywhere on the account, or (when the account holds no
        # slot, so what fills it is not ours) a jittered backoff; as InMemoryAccount does.
        wait = retry_after or random.uniform(1.0, REFUSED_WAIT_CAP if not held else 5.0)
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
        down_since: float | None = None
        self._claiming[external_task_id] += 1
        try:
            await self._listen()
            self._start_renewing()
            while True:
                event.clear()
                call = uuid.uuid4().hex
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
                    # A new create fails at once; one waiting on another's claim rides
                    # out an outage.
                    now = time.monotonic()
                    down_since = down_since or now
                    if first or now - down_since > OUTAGE_WAIT:
                        raise
                    answer = [b"down"]
                else:
                    down_since = None
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
