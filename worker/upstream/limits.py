"""Per-key concurrency limits shared by every worker process and host, kept in Redis.

Each key NAME has a sorted set of leases (member: a random token, score: expiry in Redis
server milliseconds). Taking a slot drops expired leases, counts the live ones and adds
one, all in one Lua script timed by Redis `TIME`, so a dead worker's slots come back by
themselves and client clocks do not matter. The same script skips keys that are paused
(after a 429) or taken out of use (401/403, balance, quota), and answers "cancelled" when
the job was cancelled, so no extra round trip is spent on either.

A Redis that restarts without its data forgets every lease. The script keeps an epoch
key; a process that saw an epoch before and finds none has seen the state lost, so it
starts a quarantine of one lease length (no new slot for anyone, after which every
forgotten lease would have expired) and puts back the leases it still holds itself.
A process that starts after the loss has seen no epoch in Redis, so an `EpochWitness`
outside Redis (the database) tells it the last one any process saw.
Redis outages are waited out; a lease that cannot be released expires by itself.

A lease that ends while another taker of this process waits is not released on its own:
its removal rides on that taker's next attempt, so a busy process makes one round trip per
call instead of two. Leases only ever go later than they would, never earlier.

Rate limits ride in the same script. A key with `rpm` keeps a sorted set of its calls' times,
one with `tpm` a sorted set of its calls' token reservations (amounts in a hash, with their
total), each stamped when the call takes its slot and again when it ends (the upstream saw it
arrive in between, however late the call was sent): a slot is only taken on a key whose last
window (plus a margin) has room for one more call and its tokens, so no slot is held for a
call the minute would refuse, and a key runs its whole rpm at once, then waits for the window
to turn (the script says how long, the taker sleeps that long). Tokens are reserved as the
estimate x the model's learnt billed/estimated ratio; the release settles the reservation
with the billed figure and counts a key's quota (day and month counters, keyed by UTC period,
with expiry); a key at its quota is out of use until the period turns. The release stays one
round trip (a script for a key with a window or quota, a ZREM for any other), or rides on
the next attempt as before. What calls billed against their estimates is summed in the
process and sent with a later attempt, where the ratio (an EWMA per model) learns from it.

The slot script goes over a connection of its own (`redis_lane`), the rest over redis-py.

Interactive takers go first. In a process, a priority semaphore serves them before any
waiting bulk taker. Across processes and hosts, an interactive taker that is told to wait
registers in a sorted set (member: its token, score: an expiry a moment ahead, refreshed on
each attempt); while that set has a live member, the script gives bulk takers only the
free slots beyond one per waiting interactive taker. Its entry goes when it gets a slot or
gives up, or expires if its process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import redis
import redis.asyncio as aioredis

from worker import constants, errors, metrics
from worker.settings import ApiKey
from worker.upstream.redis_lane import RedisLane, Script

log = logging.getLogger(__name__)

# Ends calls' leases and settles what they billed: a token reservation takes the billed
# figure (a refused call's, 0), and a key with a quota counts it in the day's and the month's
# counters. A call's entries in the key's windows move to `now`, the moment it ended: the
# upstream saw it arrive somewhere between its slot and its end, and counts its window from
# then. Entries of three fields: key name, token, and '' (nothing to settle) or
# "flags|billed" (flags 'r': the key has a call window, 't': a token window, 'q': a quota;
# billed '' when the call's answer said nothing of it).
# `learn` ('' or "billed|estimated|model") is what calls of a model billed against their
# estimates since the last time; the model's ratio (an EWMA) learns from it.
SETTLE_FUNCTION_LUA = """
local function settle(prefix, alpha, day, month, learn, now, first, last)
  for i = first, last, 3 do
    local name, token = ARGV[i], ARGV[i + 1]
    redis.call('ZREM', prefix .. 'slots:' .. name, token)
    local flags, billed = string.match(ARGV[i + 2], '^(%a*)|(%d*)$')
    if flags then
      billed = tonumber(billed)
      if string.find(flags, 'r', 1, true) then
        redis.call('ZADD', prefix .. 'rate:calls:' .. name, 'XX', now, token)
      end
      if string.find(flags, 't', 1, true) then
        redis.call('ZADD', prefix .. 'rate:token-times:' .. name, 'XX', now, token)
        local amounts = prefix .. 'rate:token-amounts:' .. name
        local reserved = tonumber(redis.call('HGET', amounts, token))
        if billed and reserved then
          redis.call('HSET', amounts, token, billed)
          redis.call('HINCRBY', amounts, 'sum', billed - reserved)
        end
      end
      if billed and billed > 0 and string.find(flags, 'q', 1, true) then
        local daily = prefix .. 'quota:day:' .. name .. ':' .. day
        local monthly = prefix .. 'quota:month:' .. name .. ':' .. month
        redis.call('INCRBY', daily, billed)
        redis.call('EXPIRE', daily, DAILY_TTL)
        redis.call('INCRBY', monthly, billed)
        redis.call('EXPIRE', monthly, MONTHLY_TTL)
      end
    end
  end
  if learn ~= '' then
    local billed, estimated, model = string.match(learn, '^(%d+)|(%d+)|(.*)$')
    local ratios = prefix .. 'token-ratio'
    local seen = tonumber(billed) / tonumber(estimated)
    local ratio = tonumber(redis.call('HGET', ratios, model))
    if ratio then seen = ratio + alpha * (seen - ratio) end
    redis.call('HSET', ratios, model, tostring(seen))
  end
end
""".replace("DAILY_TTL", str(constants.DAILY_QUOTA_TTL_S)).replace(
    "MONTHLY_TTL", str(constants.MONTHLY_QUOTA_TTL_S)
)

SETTLE_LUA = (
    SETTLE_FUNCTION_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
settle(ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], now, 6, #ARGV)
"""
)

ACQUIRE_LUA = (
    SETTLE_FUNCTION_LUA
    + """
local prefix = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local gate_ms = tonumber(ARGV[3])
local window_ms = tonumber(ARGV[4])
local reserve_factor = tonumber(ARGV[5])
local day, month = ARGV[7], ARGV[8]
local token = ARGV[9]
local cancel_key = ARGV[10]
local seen_epoch = ARGV[11]
local interactive = ARGV[12] == '1'
local model = ARGV[13]
local estimate = tonumber(ARGV[14])
local first_key = 17 + 3 * tonumber(ARGV[16])
local gate = prefix .. 'interactive-waiting'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Calls this process ended since its last attempt.
settle(prefix, tonumber(ARGV[6]), day, month, ARGV[15], now, 17, first_key - 1)
local epoch = redis.call('GET', prefix .. 'epoch')
if not epoch then
  epoch = token
  redis.call('SET', prefix .. 'epoch', epoch)
  if seen_epoch ~= '' then
    redis.call('SET', prefix .. 'quarantine', '1', 'PX', lease_ms)
  end
end
-- An interactive taker is in the gate set exactly while it is told to wait.
local function answer(outcome, value)
  if interactive then
    if outcome == 'wait' then
      redis.call('ZADD', gate, now + gate_ms, token)
      redis.call('PEXPIRE', gate, gate_ms)
    else
      redis.call('ZREM', gate, token)
    end
  end
  return {outcome, value, epoch}
end
if cancel_key ~= '' and redis.call('EXISTS', cancel_key) == 1 then
  return answer('cancelled', '')
end
local quarantine_ms = redis.call('PTTL', prefix .. 'quarantine')
if quarantine_ms > 0 then return answer('wait', tostring(quarantine_ms)) end
local function over_quota(name, daily, monthly)
  if daily > 0 then
    local used = tonumber(redis.call('GET', prefix .. 'quota:day:' .. name .. ':' .. day))
    if used and used >= daily then return true end
  end
  if monthly > 0 then
    local used = tonumber(redis.call('GET', prefix .. 'quota:month:' .. name .. ':' .. month))
    if used and used >= monthly then return true end
  end
  return false
end
-- Milliseconds until the key's last `rpm` calls leave the window (0: room now).
local function calls_wait(name, rpm)
  local calls = prefix .. 'rate:calls:' .. name
  redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window_ms)
  local count = redis.call('ZCARD', calls)
  if count < rpm then return 0 end
  local leaving = redis.call('ZRANGE', calls, count - rpm, count - rpm, 'WITHSCORES')
  return math.max(1, tonumber(leaving[2]) + window_ms - now)
end
local reserve = nil
local function reservation()
  if not reserve then
    local ratio = tonumber(redis.call('HGET', prefix .. 'token-ratio', model)) or 1
    reserve = math.ceil(estimate * ratio * reserve_factor)
  end
  return reserve
end
-- Milliseconds until enough of the key's reserved tokens leave the window for this call.
local function tokens_wait(name, tpm)
  local times = prefix .. 'rate:token-times:' .. name
  local amounts = prefix .. 'rate:token-amounts:' .. name
  local gone = redis.call('ZRANGEBYSCORE', times, '-inf', now - window_ms)
  if #gone > 0 then
    local freed = 0
    for _, member in ipairs(gone) do
      freed = freed + (tonumber(redis.call('HGET', amounts, member)) or 0)
      redis.call('HDEL', amounts, member)
    end
    -- Refused calls settled at 0: -0 would reach Redis as "-0", which is not an integer.
    if freed > 0 then redis.call('HINCRBY', amounts, 'sum', -freed) end
    redis.call('ZREMRANGEBYSCORE', times, '-inf', now - window_ms)
  end
  local sum = tonumber(redis.call('HGET', amounts, 'sum')) or 0
  -- A call bigger than the whole limit goes alone, into an empty window.
  local excess = sum + reservation() - tpm
  if sum <= 0 or excess <= 0 then return 0 end
  local entries = redis.call('ZRANGE', times, 0, -1, 'WITHSCORES')
  for j = 1, #entries, 2 do
    excess = excess - (tonumber(redis.call('HGET', amounts, entries[j])) or 0)
    if excess <= 0 then return math.max(1, tonumber(entries[j + 1]) + window_ms - now) end
  end
  return window_ms
end
local best, best_free, total_free = nil, 0, 0
local best_rpm, best_tpm = 0, 0
local usable, wait_ms, rate_wait_ms, slot_bound = 0, -1, -1, false
-- Keys come in threes: name, slots, and '' (no other limit) or "rpm|tpm|daily|monthly".
for i = first_key, #ARGV, 3 do
  local name = ARGV[i]
  local limit = tonumber(ARGV[i + 1])
  local rpm, tpm, daily, monthly = 0, 0, 0, 0
  if ARGV[i + 2] ~= '' then
    rpm, tpm, daily, monthly = string.match(ARGV[i + 2], '^(%d+)|(%d+)|(%d+)|(%d+)$')
    rpm, tpm, daily, monthly = tonumber(rpm), tonumber(tpm), tonumber(daily), tonumber(monthly)
  end
  if redis.call('EXISTS', prefix .. 'revoked:' .. name) == 0
      and not (daily + monthly > 0 and over_quota(name, daily, monthly)) then
    usable = usable + 1
    local pause_ms = redis.call('PTTL', prefix .. 'pause:' .. name)
    if pause_ms > 0 then
      if wait_ms < 0 or pause_ms < wait_ms then wait_ms = pause_ms end
    else
      local slots = prefix .. 'slots:' .. name
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
      local free = limit - redis.call('ZCARD', slots)
      if free <= 0 then
        slot_bound = true
      else
        local rate_ms = 0
        if rpm > 0 then rate_ms = calls_wait(name, rpm) end
        if rate_ms == 0 and tpm > 0 then rate_ms = tokens_wait(name, tpm) end
        if rate_ms > 0 then
          if rate_wait_ms < 0 or rate_ms < rate_wait_ms then rate_wait_ms = rate_ms end
        else
          total_free = total_free + free
          if free > best_free then best, best_free, best_rpm, best_tpm = name, free, rpm, tpm end
        end
      end
    end
  end
end
-- A bulk taker leaves one free slot to each interactive taker waiting anywhere.
if best and not interactive and redis.call('ZCOUNT', gate, now, '+inf') >= total_free then
  return answer('wait', '-1')
end
if best then
  local slots = prefix .. 'slots:' .. best
  redis.call('ZADD', slots, now + lease_ms, token)
  redis.call('PEXPIRE', slots, lease_ms * 2)
  if best_rpm > 0 then
    local calls = prefix .. 'rate:calls:' .. best
    redis.call('ZADD', calls, now, token)
    redis.call('PEXPIRE', calls, window_ms * 2)
  end
  if best_tpm > 0 then
    local times = prefix .. 'rate:token-times:' .. best
    local amounts = prefix .. 'rate:token-amounts:' .. best
    redis.call('ZADD', times, now, token)
    redis.call('HSET', amounts, token, reservation())
    redis.call('HINCRBY', amounts, 'sum', reservation())
    redis.call('PEXPIRE', times, window_ms * 2)
    redis.call('PEXPIRE', amounts, window_ms * 2)
  end
  return answer('ok', best)
end
if usable == 0 then return answer('none', '') end
-- A key whose window is full frees at a known moment; one whose slots are all taken may
-- free any time, so the taker then looks again soon.
if not slot_bound and rate_wait_ms > 0 and (wait_ms < 0 or rate_wait_ms < wait_ms) then
  wait_ms = rate_wait_ms
end
return answer('wait', tostring(wait_ms))
"""
)

# Put back a lease this process still holds, after Redis lost its state.
RESTORE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
"""

REDIS_DOWN_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Extend a pause, never shorten it (a later, shorter Retry-After must not cut it).
PAUSE_LUA = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
  return 1
end
return 0
"""


@dataclass
class Lease:
    """A slot held for one call; the caller sets `billed_tokens` from the answer (0 for a
    refusal such as a 429), and the release settles the key's windows and quotas with it."""

    key: ApiKey
    token: str
    model: str = ""
    estimated_tokens: int = 0
    billed_tokens: int | None = None


# An ended call as the settle step reads it: key name, token, and what to settle (see
# SETTLE_FUNCTION_LUA).
Ended = tuple[str, str, str]


class PrioritySemaphore:
    """A semaphore that serves interactive waiters before bulk ones, each in arrival order.

    A release hands its permit straight to the next waiter, so a newcomer never overtakes
    one already waiting; a waiter cancelled after it was handed a permit passes it on.
    """

    def __init__(self, value: int) -> None:
        self._free = value
        self._waiters: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    def waiting(self, interactive: bool) -> int:
        return len(self._waiters[interactive])

    async def acquire(self, interactive: bool) -> None:
        if self._free > 0:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[interactive].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a permit just as it was cancelled
            else:
                with contextlib.suppress(ValueError):  # a release may have dropped it
                    self._waiters[interactive].remove(waiter)
            raise

    def release(self) -> None:
        for interactive in (True, False):
            waiters = self._waiters[interactive]
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1


class EpochWitness(Protocol):
    """Keeps the newest epoch of the Redis state where a Redis restart does not reach."""

    def last_seen(self) -> str | None:
        """The newest epoch any process has seen; it may block (it runs in a thread)."""

    def saw(self, epoch: str) -> None:
        """Keep `epoch` as the newest; called on the event loop, so it must not block."""


class KeyPool:
    """The configured keys and their shared state in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Sequence[ApiKey],
        *,
        lease_s: float,
        window_s: float = constants.RATE_WINDOW_S,
        prefix: str = constants.REDIS_PREFIX,
        local_slots: int | None = None,
        witness: EpochWitness | None = None,
    ) -> None:
        if not keys:
            raise errors.ConfigError("no API keys configured")
        self._redis = redis
        self._keys = {k.name: k for k in keys}
        metrics.show_rate_limits(keys)
        self._lease_ms = int(lease_s * 1000)
        self._prefix = prefix
        self._acquire = Script(ACQUIRE_LUA)
        self._lane = RedisLane(redis)
        self._pause = redis.register_script(PAUSE_LUA)
        # A process never holds more than every key's slots (or its share of them, when it is
        # one of several of a worker); waiting here costs no Redis calls.
        self._local = PrioritySemaphore(local_slots or sum(k.max_concurrency for k in keys))
        # Encoded once: the script's arguments for the keys (three each) and its settings.
        self._key_args = [
            x.encode() for k in keys for x in (k.name, str(k.max_concurrency), _limits_arg(k))
        ]
        self._flags = {
            k.name: ("r" if k.rpm else "") + ("t" if k.tpm else "") + ("q" if k.has_quota else "")
            for k in keys
        }
        self._has_quotas = any(k.has_quota for k in keys)
        window_ms = int((window_s + constants.RATE_WINDOW_MARGIN_S) * 1000)
        self._static_args = [
            str(x).encode()
            for x in (
                prefix,
                self._lease_ms,
                int(constants.INTERACTIVE_GATE_S * 1000),
                window_ms,
                constants.TOKEN_RESERVE_FACTOR,
                constants.TOKEN_RATIO_ALPHA,
            )
        ]
        self._settle = redis.register_script(SETTLE_LUA)
        self._restore = redis.register_script(RESTORE_LUA)
        self._held: dict[str, str] = {}
        # What each waiting taker asks for (model, estimated tokens), by its token.
        self._asks: dict[str, tuple[str, int]] = {}
        # Ended calls that the next attempt of this process releases and settles.
        self._ended: list[Ended] = []
        # Per model: tokens billed and estimated by calls since they were last sent.
        self._observed: dict[str, list[int]] = {}
        self._learn_due_s = 0.0
        # Without a token window the script needs no model nor estimate.
        self._uses_estimates = any(k.tpm for k in keys)
        self._period: tuple[int, str, str] = (-1, "", "")
        self._releasing: set[asyncio.Task[None]] = set()
        self._epoch: str | None = None
        self._witness = witness
        self._witness_read: asyncio.Future[str | None] | None = None

    def _cancel_key(self, job_id: str | None) -> str:
        if job_id is None:
            return ""
        return self._prefix + f"cancelled:{job_id}"

    async def _try_acquire(self, token: str, job_id: str | None) -> tuple[str, str]:
        """One attempt of a bulk taker."""
        return await self._attempt(token, job_id, interactive=False)

    async def _try_acquire_interactive(self, token: str, job_id: str | None) -> tuple[str, str]:
        """One attempt of an interactive taker; told to wait, it holds bulk takers back."""
        return await self._attempt(token, job_id, interactive=True)

    async def _attempt(self, token: str, job_id: str | None, interactive: bool) -> tuple[str, str]:
        if self._epoch is None and self._witness is not None:
            # Before the first answer: the epoch seen before this process, so that a Redis
            # emptied before it started still starts the quarantine. One read for all takers.
            if self._witness_read is None:
                self._witness_read = asyncio.ensure_future(
                    asyncio.to_thread(self._witness.last_seen)
                )
            seen = await asyncio.shield(self._witness_read)
            self._epoch = self._epoch or seen
        ended, self._ended = self._ended, []
        model, estimated = self._asks.get(token, ("", 0)) if self._uses_estimates else ("", 0)
        learn = self._learn_arg(time.monotonic())
        try:
            outcome, value, epoch = await self._lane.run_script(
                self._acquire,
                [
                    *self._static_args,
                    *self._periods(),
                    token,
                    self._cancel_key(job_id),
                    self._epoch or "",
                    "1" if interactive else "0",
                    model,
                    estimated,
                    learn,
                    len(ended),
                    *(x for entry in ended for x in entry),
                    *self._key_args,
                ],
                if_abandoned=functools.partial(self._give_back, token),
            )
        except BaseException:
            self._ended += ended  # not sent: the next attempt, or the flush, releases them
            self._unsent(learn)
            raise
        epoch = _text(epoch)
        if epoch != self._epoch:
            if self._epoch is not None:
                await self._restore_held()
            self._epoch = epoch
            if self._witness is not None:
                self._witness.saw(epoch)
        return _text(outcome), _text(value)

    def _give_back(self, token: str, reply: object) -> None:
        """Release the slot an attempt took if its taker was cancelled before the answer."""
        if isinstance(reply, list) and reply[0] == b"ok":
            self._ended.append(self._ended_entry(Lease(self._keys[_text(reply[1])], token)))
            self._flush_ended()

    async def _restore_held(self) -> None:
        log.warning("action=redis_state_lost held_leases=%d", len(self._held))
        for token, key_name in list(self._held.items()):
            await self._restore(
                keys=[self._prefix + f"slots:{key_name}"], args=[self._lease_ms, token]
            )

    def _periods(self) -> tuple[str, str]:
        """The UTC day and month that quota counters count in ('' with no quota)."""
        if not self._has_quotas:
            return "", ""
        day_number = int(time.time() // 86400)
        if self._period[0] != day_number:
            day = dt.date(1970, 1, 1) + dt.timedelta(days=day_number)
            self._period = (day_number, day.isoformat(), day.isoformat()[:7])
        return self._period[1], self._period[2]

    def _ended_entry(self, lease: Lease) -> Ended:
        name, billed = lease.key.name, lease.billed_tokens
        if billed and lease.estimated_tokens and lease.model:
            seen = self._observed.setdefault(lease.model, [0, 0])
            seen[0] += billed
            seen[1] += lease.estimated_tokens
        flags = self._flags[name]
        if not flags:
            return name, lease.token, ""
        return name, lease.token, f"{flags}|{'' if billed is None else billed}"

    def _learn_arg(self, now_s: float | None = None) -> str:
        """One model's billed and estimated tokens since they were last sent ('' if none, or,
        given the time, if the last were sent less than a moment ago)."""
        if not self._observed or (now_s is not None and now_s < self._learn_due_s):
            return ""
        if now_s is not None:
            self._learn_due_s = now_s + constants.TOKEN_RATIO_SEND_S
        model, (billed, estimated) = self._observed.popitem()
        return f"{billed}|{estimated}|{model}"

    def _unsent(self, learn: str) -> None:
        """Keep an observation whose trip failed for the next one."""
        if learn:
            billed, estimated, model = learn.split("|", 2)
            seen = self._observed.setdefault(model, [0, 0])
            seen[0] += int(billed)
            seen[1] += int(estimated)

    @asynccontextmanager
    async def slot(
        self,
        job_id: str | None = None,
        priority: str = constants.QUEUE_BULK,
        *,
        model: str = "",
        estimated_tokens: int = 0,
    ) -> AsyncIterator[Lease]:
        """Hold one slot of some usable key for the duration of the block.

        The key chosen has room in its rpm / tpm windows for this call (of
        `estimated_tokens` x the model's learnt ratio) and is within its quotas. An
        interactive taker gets the next free slot before any bulk taker waiting here
        or in another process.
        """
        interactive = priority == constants.QUEUE_INTERACTIVE
        await self._local.acquire(interactive)
        try:
            lease = await self._wait_for_slot(job_id, interactive, model, estimated_tokens)
            self._held[lease.token] = lease.key.name
            try:
                yield lease
            finally:
                del self._held[lease.token]
                if self._local.waiting(True) or self._local.waiting(False):
                    self._ended.append(self._ended_entry(lease))
                else:
                    await self._release([self._ended_entry(lease)])
        finally:
            self._local.release()
            if self._ended:
                # Runs after the taker just woken has made its attempt (callbacks run in
                # order): releases whatever that attempt did not take, if it was cancelled.
                asyncio.get_running_loop().call_soon(self._flush_ended)

    async def _release(self, ended: Sequence[Ended], learn: str = "") -> None:
        try:
            if learn or any(entry[2] for entry in ended):
                await self._settle(
                    args=[
                        self._static_args[0],
                        self._static_args[5],
                        *self._periods(),
                        learn,
                        *(x for entry in ended for x in entry),
                    ]
                )
            else:  # the common case: a key with no window or quota to settle
                for key_name, token, _ in ended:
                    await self._redis.zrem(self._prefix + f"slots:{key_name}", token)
        except REDIS_DOWN_ERRORS:
            # The leases expire by themselves; the billed figures are lost to the windows.
            log.warning("action=slot_release_failed keys=%s", ",".join({e[0] for e in ended}))

    def _flush_ended(self) -> None:
        if not self._ended:
            return
        ended, self._ended = self._ended, []
        task = asyncio.get_running_loop().create_task(self._release(ended))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Release what is left to release, then close the slot script's connection."""
        await self.flush()
        await self._lane.aclose()

    async def __aenter__(self) -> KeyPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def flush(self) -> None:
        """Release every ended lease, and send what the ratios are to learn, now (before the
        process stops)."""
        self._flush_ended()
        if self._releasing:
            await asyncio.gather(*self._releasing)
        while self._observed:
            await self._release([], self._learn_arg())

    async def _wait_for_slot(
        self, job_id: str | None, interactive: bool, model: str, estimated_tokens: int
    ) -> Lease:
        token = uuid.uuid4().hex
        self._asks[token] = (model, estimated_tokens)
        try:
            key = await self._poll(token, job_id, interactive=interactive)
        except BaseException:
            if interactive:
                await self._leave_gate(token)  # gave up while waiting: stop holding bulk back
            raise
        finally:
            del self._asks[token]
        return Lease(key, token, model, estimated_tokens)

    async def _leave_gate(self, token: str) -> None:
        try:
            await self._redis.zrem(self._prefix + "interactive-waiting", token)
        except REDIS_DOWN_ERRORS:
            log.warning("action=gate_leave_failed")  # the entry expires by itself

    async def _poll(self, token: str, job_id: str | None, *, interactive: bool) -> ApiKey:
        """Attempt until a slot is taken, pausing a little longer after each refusal."""
        attempt = self._try_acquire_interactive if interactive else self._try_acquire
        poll_s = constants.SLOT_POLL_MIN_S
        outage_s = 0.0
        while True:
            try:
                outcome, value = await attempt(token, job_id)
            except REDIS_DOWN_ERRORS:
                # Redis restarting: wait it out; no call is made without a slot.
                outage_s = min(max(outage_s * 2, 0.1), constants.REDIS_RETRY_MAX_S)
                log.warning("action=redis_unreachable retry_in_s=%.1f", outage_s)
                await asyncio.sleep(outage_s)
                continue
            outage_s = 0.0
            if outcome == "ok":
                return self._keys[value]
            if outcome == "cancelled":
                raise errors.Cancelled(f"job {job_id} was cancelled")
            if outcome == "none":
                raise errors.NoUsableKey(await self.describe_unusable())
            wait_s = poll_s * random.uniform(0.8, 1.2)
            if interactive:
                # Any slot may come free at any moment (and bulk takers leave it alone):
                # look again soon, whatever a pause on some key says.
                poll_s = min(poll_s * 2, constants.INTERACTIVE_POLL_MAX_S)
            else:
                if int(value) > 0:
                    # Nothing frees before then (a pause ends, a window has room): no sooner,
                    # and, spread a little, not much later.
                    wait_s = int(value) / 1000 + random.uniform(0, constants.SLOT_POLL_MAX_S)
                poll_s = min(poll_s * 2, constants.SLOT_POLL_MAX_S)
            await asyncio.sleep(wait_s)

    async def pause(self, key_name: str, seconds: float) -> None:
        """Stop every worker from calling on this key for `seconds` (after a 429)."""
        try:
            await self._pause(
                keys=[self._prefix + f"pause:{key_name}"],
                args=[max(1, int(seconds * 1000)), "1"],
            )
        except REDIS_DOWN_ERRORS:
            log.warning("action=pause_failed key=%s", key_name)

    async def take_out_of_use(self, key_name: str, reason: str, seconds: float | None) -> None:
        name = self._prefix + f"revoked:{key_name}"
        try:
            if seconds:
                await self._redis.set(name, reason, px=max(1, int(seconds * 1000)))
            else:
                await self._redis.set(name, reason)
        except REDIS_DOWN_ERRORS:
            log.warning("action=revoke_failed key=%s", key_name)

    async def describe_unusable(self) -> str:
        reasons = []
        for name, key in self._keys.items():
            reason = await self._redis.get(self._prefix + f"revoked:{name}")
            if reason is not None:
                reasons.append(f"'{name}' ({_text(reason)})")
            reasons += await self._quota_reasons(key)
        return "no usable API key left: " + ", ".join(reasons or ["none configured"])

    async def quota_used(self, key_name: str) -> tuple[int, int]:
        """Tokens billed to the key in this UTC day and month (counted for keys with a quota)."""
        day, month = self._periods()
        daily, monthly = await self._redis.mget(
            self._prefix + f"quota:day:{key_name}:{day}",
            self._prefix + f"quota:month:{key_name}:{month}",
        )
        return int(daily or 0), int(monthly or 0)

    async def _quota_reasons(self, key: ApiKey) -> list[str]:
        if not key.has_quota:
            return []
        daily, monthly = await self.quota_used(key.name)
        today = dt.date(1970, 1, 1) + dt.timedelta(days=int(time.time() // 86400))
        reasons = []
        if key.daily_tokens is not None and daily >= key.daily_tokens:
            until = today + dt.timedelta(days=1)
            reasons.append(_quota_reason(key.name, "daily", key.daily_tokens, until))
        if key.monthly_tokens is not None and monthly >= key.monthly_tokens:
            until = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
            reasons.append(_quota_reason(key.name, "monthly", key.monthly_tokens, until))
        return reasons

    async def in_use(self, key_name: str) -> int:
        """Live leases of a key (for status displays and tests)."""
        return int(await self._redis.zcard(self._prefix + f"slots:{key_name}"))


def _limits_arg(key: ApiKey) -> str:
    limits = (key.rpm, key.tpm, key.daily_tokens, key.monthly_tokens)
    return "|".join(str(x or 0) for x in limits) if any(limits) else ""


def _quota_reason(name: str, period: str, cap: int, until: dt.date) -> str:
    return f"key '{name}' reached its {period} quota of {cap:,} tokens until {until}T00:00Z"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
