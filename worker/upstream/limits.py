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
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import redis
import redis.asyncio as aioredis

from worker import constants, errors
from worker.settings import ApiKey

log = logging.getLogger(__name__)

ACQUIRE_LUA = """
local prefix = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local token = ARGV[3]
local cancel_key = ARGV[4]
local seen_epoch = ARGV[5]
local interactive = ARGV[6] == '1'
local gate_ms = tonumber(ARGV[7])
local releases = tonumber(ARGV[8])
local first_key = 9 + 2 * releases
local gate = prefix .. 'interactive-waiting'
-- Leases this process ended since its last attempt: (key name, token) pairs.
for i = 9, first_key - 1, 2 do
  redis.call('ZREM', prefix .. 'slots:' .. ARGV[i], ARGV[i + 1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
local best, best_free, total_free = nil, 0, 0
local usable, wait_ms = 0, -1
for i = first_key, #ARGV, 2 do
  local name = ARGV[i]
  local limit = tonumber(ARGV[i + 1])
  if redis.call('EXISTS', prefix .. 'revoked:' .. name) == 0 then
    usable = usable + 1
    local pause_ms = redis.call('PTTL', prefix .. 'pause:' .. name)
    if pause_ms > 0 then
      if wait_ms < 0 or pause_ms < wait_ms then wait_ms = pause_ms end
    else
      local slots = prefix .. 'slots:' .. name
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
      local free = limit - redis.call('ZCARD', slots)
      if free > 0 then total_free = total_free + free end
      if free > best_free then best, best_free = name, free end
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
  return answer('ok', best)
end
if usable == 0 then return answer('none', '') end
return answer('wait', tostring(wait_ms))
"""

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


@dataclass(frozen=True)
class Lease:
    key: ApiKey
    token: str


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
        prefix: str = constants.REDIS_PREFIX,
        local_slots: int | None = None,
        witness: EpochWitness | None = None,
    ) -> None:
        if not keys:
            raise errors.ConfigError("no API keys configured")
        self._redis = redis
        self._keys = {k.name: k for k in keys}
        self._lease_ms = int(lease_s * 1000)
        self._prefix = prefix
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._pause = redis.register_script(PAUSE_LUA)
        # A process never holds more than every key's slots (or its share of them, when it is
        # one of several of a worker); waiting here costs no Redis calls.
        self._local = PrioritySemaphore(local_slots or sum(k.max_concurrency for k in keys))
        self._key_args = [x for k in keys for x in (k.name, str(k.max_concurrency))]
        self._restore = redis.register_script(RESTORE_LUA)
        self._held: dict[str, str] = {}
        # Ended leases (key name, token) that the next attempt of this process releases.
        self._ended: list[tuple[str, str]] = []
        self._releasing: set[asyncio.Task[None]] = set()
        self._epoch: str | None = None
        self._witness = witness
        self._witness_read: asyncio.Future[str | None] | None = None
        self._gate_ms = int(constants.INTERACTIVE_GATE_S * 1000)

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
        try:
            outcome, value, epoch = await self._acquire(
                args=[
                    self._prefix,
                    self._lease_ms,
                    token,
                    self._cancel_key(job_id),
                    self._epoch or "",
                    "1" if interactive else "0",
                    self._gate_ms,
                    len(ended),
                    *(x for pair in ended for x in pair),
                    *self._key_args,
                ]
            )
        except BaseException:
            self._ended += ended  # not sent: the next attempt, or the flush, releases them
            raise
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            # redis-py (8.1) can swallow a cancellation that lands while it reconnects; the
            # taker would then poll on for ever. Give back what the script took, and stop.
            if _text(outcome) == "ok":
                self._ended.append((_text(value), token))
                asyncio.get_running_loop().call_soon(self._flush_ended)
            raise asyncio.CancelledError
        epoch = _text(epoch)
        if epoch != self._epoch:
            if self._epoch is not None:
                await self._restore_held()
            self._epoch = epoch
            if self._witness is not None:
                self._witness.saw(epoch)
        return _text(outcome), _text(value)

    async def _restore_held(self) -> None:
        log.warning("action=redis_state_lost held_leases=%d", len(self._held))
        for token, key_name in list(self._held.items()):
            await self._restore(
                keys=[self._prefix + f"slots:{key_name}"], args=[self._lease_ms, token]
            )

    @asynccontextmanager
    async def slot(
        self, job_id: str | None = None, priority: str = constants.QUEUE_BULK
    ) -> AsyncIterator[Lease]:
        """Hold one slot of some usable key for the duration of the block.

        An interactive taker gets the next free slot before any bulk taker waiting here
        or in another process.
        """
        interactive = priority == constants.QUEUE_INTERACTIVE
        await self._local.acquire(interactive)
        try:
            lease = await self._wait_for_slot(job_id, interactive)
            self._held[lease.token] = lease.key.name
            try:
                yield lease
            finally:
                del self._held[lease.token]
                if self._local.waiting(True) or self._local.waiting(False):
                    self._ended.append((lease.key.name, lease.token))
                else:
                    await self._release([(lease.key.name, lease.token)])
        finally:
            self._local.release()
            if self._ended:
                # Runs after the taker just woken has made its attempt (callbacks run in
                # order): releases whatever that attempt did not take, if it was cancelled.
                asyncio.get_running_loop().call_soon(self._flush_ended)

    async def _release(self, leases: Sequence[tuple[str, str]]) -> None:
        for key_name, token in leases:
            try:
                await self._redis.zrem(self._prefix + f"slots:{key_name}", token)
            except REDIS_DOWN_ERRORS:
                log.warning("action=slot_release_failed key=%s", key_name)

    def _flush_ended(self) -> None:
        if not self._ended:
            return
        ended, self._ended = self._ended, []
        task = asyncio.get_running_loop().create_task(self._release(ended))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def flush(self) -> None:
        """Release every ended lease now (before the process stops)."""
        self._flush_ended()
        if self._releasing:
            await asyncio.gather(*self._releasing)

    async def _wait_for_slot(self, job_id: str | None, interactive: bool) -> Lease:
        token = uuid.uuid4().hex
        if not interactive:
            return await self._poll(token, job_id, interactive=False)
        try:
            return await self._poll(token, job_id, interactive=True)
        except BaseException:
            await self._leave_gate(token)  # gave up while waiting: stop holding bulk back
            raise

    async def _leave_gate(self, token: str) -> None:
        try:
            await self._redis.zrem(self._prefix + "interactive-waiting", token)
        except REDIS_DOWN_ERRORS:
            log.warning("action=gate_leave_failed")  # the entry expires by itself

    async def _poll(self, token: str, job_id: str | None, *, interactive: bool) -> Lease:
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
                return Lease(self._keys[value], token)
            if outcome == "cancelled":
                raise errors.Cancelled(f"job {job_id} was cancelled")
            if outcome == "none":
                raise errors.NoUsableKey(await self.describe_unusable())
            wait_s = poll_s
            if interactive:
                # Any slot may come free at any moment (and bulk takers leave it alone):
                # look again soon, whatever a pause on some key says.
                poll_s = min(poll_s * 2, constants.INTERACTIVE_POLL_MAX_S)
            else:
                if int(value) > 0:
                    wait_s = max(poll_s, int(value) / 1000)
                poll_s = min(poll_s * 2, constants.SLOT_POLL_MAX_S)
            await asyncio.sleep(wait_s * random.uniform(0.8, 1.2))

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
        for name in self._keys:
            reason = await self._redis.get(self._prefix + f"revoked:{name}")
            if reason is not None:
                reasons.append(f"'{name}' ({_text(reason)})")
        return "no usable API key left: " + ", ".join(reasons or ["none configured"])

    async def in_use(self, key_name: str) -> int:
        """Live leases of a key (for status displays and tests)."""
        return int(await self._redis.zcard(self._prefix + f"slots:{key_name}"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
