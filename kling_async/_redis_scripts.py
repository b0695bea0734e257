"""The Lua scripts of `kling_async.redis.RedisAccount` and the layout of its keys.

Every script gets the same keys, in the order of `KEY_NAMES` (under the account's
prefix ``kling:{name}:``), and reads them by name: `PRELUDE` starts with one Lua local
per key (``LEASES_KEY`` is ``KEYS[1]``, ...), made from `KEY_NAMES`, so a script never
addresses a key by its position. The claim scripts get one key more, the id's settled
record (``RECORD_KEY``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ABANDON",
    "ACQUIRE",
    "CLAIM",
    "CREATED",
    "EXPIRED",
    "KEY_NAMES",
    "REFUSED",
    "RELEASE",
    "RENEW",
    "SETTLE",
]

# The keys every script gets, in this order (after the prefix).
KEY_NAMES: Final = (
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

#: Every key by name, and the claim scripts' settled record of an id last.
_ALL_KEYS: Final = (*KEY_NAMES, "record")

# ARGV 1-4 of every script: lease_ms, process id, candidate epoch, max_running ('' if none).
# Reads Redis's TIME and advances the logical clock by the time since the last script,
# at most a third of a lease (the smallest lease any process passed).
PRELUDE = (
    "\n".join(f"local {key.upper()}_KEY = KEYS[{i}]" for i, key in enumerate(_ALL_KEYS, 1))
    + """
local t = redis.call('TIME')
local wall = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local LEASE = tonumber(ARGV[1])
local ME = ARGV[2]
local c = redis.call('HMGET', CLOCK_KEY, 't', 'c', 'k', 'q', 'l')
local cap = math.min(tonumber(c[3]) or LEASE, math.floor(LEASE / 3))
local now = tonumber(c[2]) or 0
if c[1] then now = now + math.max(0, math.min(wall - tonumber(c[1]), cap)) end
local calm = tonumber(c[4]) or 0
local lost_at = tonumber(c[5]) or -1e15
local epoch = redis.call('GET', EPOCH_KEY)
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', EPOCH_KEY, epoch)
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
redis.call('HSET', CLOCK_KEY, 't', wall, 'c', now, 'k', cap, 'q', calm, 'l', lost_at)
local quiet = now < calm

local function register()
  redis.call('ZADD', PROCS_KEY, now + LEASE, ME)
  redis.call('HSET', GIVEN_KEY, ME, ARGV[4])
end

-- The smallest and largest max_running given by a live process (false: none given).
local function given()
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', PROCS_KEY, '-inf', '(' .. now)) do
    redis.call('ZREM', PROCS_KEY, p)
    redis.call('HDEL', GIVEN_KEY, p)
  end
  local low, high = false, false
  for _, v in ipairs(redis.call('HVALS', GIVEN_KEY)) do
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
  local doc = redis.call('HGET', LEASES_KEY, id)
  if not doc then return 0 end
  local lease = cjson.decode(doc)
  if lease.t and lease.t ~= '' and redis.call('HGET', TASKS_KEY, lease.t) == id then
    redis.call('HDEL', TASKS_KEY, lease.t)
  end
  if lease.e and redis.call('HGET', EXTS_KEY, lease.e) == id then
    redis.call('HDEL', EXTS_KEY, lease.e)
  end
  redis.call('HDEL', LEASES_KEY, id)
  redis.call('ZREM', EXPIRY_KEY, id)
  if redis.call('ZCARD', QUEUE_KEY) > 0 or redis.call('EXISTS', BACKOFF_KEY) == 1 then
    redis.call('PUBLISH', FREED_KEY, 'free')
  end
  return 1
end
"""
)

# ARGV 5-7: waiter lease_id ext. Returns {taken, epoch, limit, lowest given, highest}.
ACQUIRE = (
    PRELUDE
    + """
for _, w in ipairs(redis.call('ZRANGEBYSCORE', WAITERS_KEY, '-inf', '(' .. now)) do
  redis.call('ZREM', QUEUE_KEY, w)
  redis.call('ZREM', WAITERS_KEY, w)
end
register()
local low, high = given()
-- The plan's limit, or the learned one (1 before anything was learned: slow start).
local limit = low or tonumber(redis.call('GET', LIMIT_KEY)) or 1
limit = math.max(1, math.floor(limit))
if redis.call('HEXISTS', LEASES_KEY, ARGV[6]) == 1 then
  -- An earlier take of this very slot timed out at the caller but got through: its own.
  redis.call('ZADD', EXPIRY_KEY, now + LEASE, ARGV[6])
  redis.call('ZREM', QUEUE_KEY, ARGV[5])
  redis.call('ZREM', WAITERS_KEY, ARGV[5])
  return {1, epoch, limit, low or 0, high or 0}
end
local room = limit - redis.call('HLEN', LEASES_KEY)
local rank = redis.call('ZRANK', QUEUE_KEY, ARGV[5])
local ahead
if rank then
  -- Only other processes' waiters count: ours behind us locally try only when they
  -- lead our local queue, so waiting for them would stall us all.
  ahead = 0
  if rank > 0 then
    local mine = ME .. ':'
    for _, w in ipairs(redis.call('ZRANGE', QUEUE_KEY, 0, rank - 1)) do
      if string.sub(w, 1, #mine) ~= mine then ahead = ahead + 1 end
    end
  end
else
  ahead = redis.call('ZCARD', QUEUE_KEY)
end
if ahead < room and not quiet then
  redis.call('HSET', LEASES_KEY, ARGV[6], cjson.encode({e = ARGV[7], t = '', o = ME}))
  redis.call('ZADD', EXPIRY_KEY, now + LEASE, ARGV[6])
  redis.call('HSET', EXTS_KEY, ARGV[7], ARGV[6])
  redis.call('ZREM', QUEUE_KEY, ARGV[5])
  redis.call('ZREM', WAITERS_KEY, ARGV[5])
  return {1, epoch, limit, low or 0, high or 0}
end
if not rank then
  redis.call('ZADD', QUEUE_KEY, redis.call('INCR', TICKET_KEY), ARGV[5])
end
redis.call('ZADD', WAITERS_KEY, now + LEASE, ARGV[5])
return {0, epoch, limit, low or 0, high or 0}
"""
)

# ARGV 5-8: lease_id task_id terminal learn. Returns the learned limit (0: not learned).
# Learning, as TCP learns a window: while `steady` is unset (no 1303 seen yet) the limit
# grows by one slot per create accepted at the limit (doubling per round of creates);
# after that by 1/limit. Only creates accepted *at* the limit count: room nobody asked
# for proves nothing.
CREATED = (
    PRELUDE
    + """
local function learned()
  if ARGV[8] ~= '1' then return 0 end
  local limit = tonumber(redis.call('GET', LIMIT_KEY)) or 1
  local whole = math.max(1, math.floor(limit))
  if redis.call('HLEN', LEASES_KEY) < whole then return whole end
  local raised = limit + 1
  if redis.call('EXISTS', STEADY_KEY) == 1 then raised = limit + 1 / limit end
  redis.call('SET', LIMIT_KEY, string.format('%.17g', raised))
  if math.floor(raised) > whole and redis.call('ZCARD', QUEUE_KEY) > 0 then
    redis.call('PUBLISH', FREED_KEY, 'free')
  end
  return math.max(1, math.floor(raised))
end
local doc = redis.call('HGET', LEASES_KEY, ARGV[5])
if not doc then return 0 end
if ARGV[7] == '1' then
  free(ARGV[5])
  return 0
end
local lease = cjson.decode(doc)
lease.t = ARGV[6]
redis.call('HSET', LEASES_KEY, ARGV[5], cjson.encode(lease))
redis.call('HSET', TASKS_KEY, ARGV[6], ARGV[5])
return learned()
"""
)

# ARGV 5-8: lease_id task_id ext expiry: the lease by its id, else by task id, else by
# ext; with `expiry`, only while the lease's expiry is still that (a look-up's re-lease:
# its holder renewing it meanwhile proves it alive).
RELEASE = (
    PRELUDE
    + """
local id = ARGV[5]
if id == '' and ARGV[6] ~= '' then id = redis.call('HGET', TASKS_KEY, ARGV[6]) end
if (not id or id == '') and ARGV[7] ~= '' then id = redis.call('HGET', EXTS_KEY, ARGV[7]) end
if not id or id == '' then return 0 end
if ARGV[8] and ARGV[8] ~= '' and redis.call('ZSCORE', EXPIRY_KEY, id) ~= ARGV[8] then return 0 end
return free(id)
"""
)

# ARGV 5-7: lease_id learn wait_ms. Returns {slots still held, learned limit (0: not)}.
# A 1303 lowers the limit at once to the slots held less the refused one (every other
# slot is a task the service accepted) and ends the slow start. The refused create then
# waits (up to wait_ms) for a slot to free: `backoff` asks `free` to announce it.
REFUSED = (
    PRELUDE
    + """
local limit = 0
if ARGV[6] == '1' then
  limit = math.max(1, redis.call('HLEN', LEASES_KEY) - 1)
  redis.call('SET', LIMIT_KEY, limit)
  redis.call('SET', STEADY_KEY, '1')
end
if redis.call('PTTL', BACKOFF_KEY) < tonumber(ARGV[7]) then
  redis.call('SET', BACKOFF_KEY, '1', 'PX', ARGV[7])
end
free(ARGV[5])
return {redis.call('HLEN', LEASES_KEY), limit}
"""
)

# ARGV 5-6: lease_id waiter. A cancelled acquire: drop its lease if the take got through,
# and its queue place.
ABANDON = (
    PRELUDE
    + """
redis.call('ZREM', WAITERS_KEY, ARGV[6])
local was_queued = redis.call('ZREM', QUEUE_KEY, ARGV[6])
if free(ARGV[5]) == 0 and was_queued == 1 and redis.call('ZCARD', QUEUE_KEY) > 0 then
  redis.call('PUBLISH', FREED_KEY, 'free')
end
return 1
"""
)

# ARGV 5: max. Leases whose holder stopped renewing them for a lease of answering time,
# leased again to the caller for a look-up. Never during the quarantine.
EXPIRED = (
    PRELUDE
    + """
local out = {}
if quiet then return out end
local due = redis.call('ZRANGEBYSCORE', EXPIRY_KEY, '-inf', '(' .. now, 'LIMIT', 0, ARGV[5])
for _, id in ipairs(due) do
  local doc = redis.call('HGET', LEASES_KEY, id)
  if doc then
    redis.call('ZADD', EXPIRY_KEY, now + LEASE, id)
    table.insert(out, id)
    table.insert(out, doc)
    table.insert(out, redis.call('ZSCORE', EXPIRY_KEY, id))
  else
    redis.call('ZREM', EXPIRY_KEY, id)
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
RENEW = (
    PRELUDE
    + """
local a = cjson.decode(ARGV[5])
local force = a.f == 1
register()
local gone, lost = {}, {}
for _, l in ipairs(a.l) do
  local id, ext, task = l[1], l[2], l[3]
  if redis.call('HEXISTS', LEASES_KEY, id) == 1 then
    redis.call('ZADD', EXPIRY_KEY, now + LEASE, id)
  elseif force then
    redis.call('HSET', LEASES_KEY, id, cjson.encode({e = ext, t = task, o = ME}))
    redis.call('ZADD', EXPIRY_KEY, now + LEASE, id)
    redis.call('HSET', EXTS_KEY, ext, id)
    if task ~= '' then redis.call('HSET', TASKS_KEY, task, id) end
  else
    table.insert(gone, id)
  end
end
for _, w in ipairs(a.w) do
  if force and not redis.call('ZSCORE', QUEUE_KEY, w) then
    redis.call('ZADD', QUEUE_KEY, redis.call('INCR', TICKET_KEY), w)
    redis.call('ZADD', WAITERS_KEY, now + LEASE, w)
  else
    -- A place lost otherwise is taken anew by the waiter's own next take (a waiter
    -- whose take just went through must not be queued again here).
    redis.call('ZADD', WAITERS_KEY, 'XX', now + LEASE, w)
  end
end
for _, id in ipairs(a.d) do free(id) end
for _, c in ipairs(a.c) do
  local v = redis.call('HGET', CLAIMS_KEY, c[1])
  if (v and string.match(v, '|([^|]*)$') == c[2]) or (not v and force) then
    redis.call('HSET', CLAIMS_KEY, c[1], ME .. '|' .. (now + a.cm) .. '|' .. now .. '|' .. c[2])
  else
    table.insert(lost, c[1])
  end
end
for _, c in ipairs(a.x) do
  local v = redis.call('HGET', CLAIMS_KEY, c[1])
  if v and string.match(v, '|([^|]*)$') == c[2] then redis.call('HDEL', CLAIMS_KEY, c[1]) end
end
local low, high = given()
local limit = low or tonumber(redis.call('GET', LIMIT_KEY)) or 1
return {epoch, gone, lost, math.max(1, math.floor(limit)), low or 0, high or 0}
"""
)

# Within CLAIM_LEASES + 1 leases of Redis losing its data (or of a name's first use: the
# same to Redis), a claim with nothing known against it says how long ago that was.
# RECORD_KEY: the id's settled record. ARGV 5-8: ext claim_ms call adopt ('1': no create of
# this process holds the id, so a claim of this process found here was granted to a call
# that timed out or a create whose settle was lost: the process takes it over).
# Returns {'task', doc} | {'wait', epoch} | {'mine', epoch, maybe_since_ms (-1: none), why}.
CLAIM = (
    PRELUDE
    + """
local settled = redis.call('GET', RECORD_KEY)
if settled and string.sub(settled, 1, 1) == '{' then return {'task', settled} end
local since, why = -1, ''
local v = redis.call('HGET', CLAIMS_KEY, ARGV[5])
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
redis.call('HSET', CLAIMS_KEY, ARGV[5], claim)
return {'mine', epoch, since, why}
"""
)

# RECORD_KEY: the id's settled record. ARGV 5-9: ext task_json settled_ttl_s maybe call.
SETTLE = (
    PRELUDE
    + """
if ARGV[6] ~= '' then
  redis.call('SET', RECORD_KEY, ARGV[6], 'EX', ARGV[7])
elseif ARGV[8] == '1' then
  redis.call('SET', RECORD_KEY, 'm:' .. wall, 'EX', ARGV[7])
end
local v = redis.call('HGET', CLAIMS_KEY, ARGV[5])
if v and string.match(v, '|([^|]*)$') == ARGV[9] then redis.call('HDEL', CLAIMS_KEY, ARGV[5]) end
redis.call('PUBLISH', SETTLED_KEY, ARGV[5])
return 1
"""
)
