"""Per-key slots in the real Redis: limits across pools, dead holders, pauses, revocation, cancel.

Each KeyPool gets its own Redis connection, as separate worker processes would. Key NAMEs
and job ids carry a per-run suffix, so workers of other suites that share this Redis
database (and call their keys plain "alpha" and "beta") never touch these tests' state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from worker import constants, errors
from worker.settings import ApiKey
from worker.upstream.limits import KeyPool

LEASE_S = 30.0
RUN = uuid.uuid4().hex[:8]
ALPHA = f"alpha-{RUN}"
BETA = f"beta-{RUN}"
SECRETS = {ALPHA: "sk-test-alpha-0123456789abcdef", BETA: "sk-test-beta-fedcba9876543210"}


def api_keys(alpha: int | None = None, beta: int | None = None) -> list[ApiKey]:
    limits = {ALPHA: alpha, BETA: beta}
    return [ApiKey(name, SecretStr(SECRETS[name]), n) for name, n in limits.items() if n]


def job(name: str) -> str:
    return f"{name}-{RUN}"


def slots_key(name: str) -> str:
    return constants.SLOTS_KEY.format(name=name)


def pause_key(name: str) -> str:
    return constants.PAUSE_KEY.format(name=name)


@asynccontextmanager
async def connect(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def run(coro: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await coro()

    return asyncio.run(bounded())


async def redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class ObservedPool(KeyPool):
    """A KeyPool that says when one of its callers has been told to wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waited = asyncio.Event()

    async def _try_acquire(self, token: str, job_id: str | None) -> tuple[str, str]:
        outcome = await super()._try_acquire(token, job_id)
        if outcome[0] == "wait":
            self.waited.set()
        return outcome


# --- (a) limits hold across pools -------------------------------------------------------------


def test_two_pools_sharing_redis_never_exceed_any_keys_limit(redis_url: str) -> None:
    limits = {ALPHA: 3, BETA: 2}
    in_use: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    redis_peak: Counter[str] = Counter()
    finished = 0

    async def main() -> None:
        nonlocal finished
        async with (
            connect(redis_url) as first,
            connect(redis_url) as second,
            KeyPool(first, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as first_pool,
            KeyPool(second, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as second_pool,
        ):
            pools = [first_pool, second_pool]

            async def one(i: int) -> None:
                nonlocal finished
                pool = pools[i % 2]
                async with pool.slot() as lease:
                    name = lease.key.name
                    in_use[name] += 1
                    try:
                        peak[name] = max(peak[name], in_use[name])
                        # The shared count, as every process sees it, not only this test's.
                        live = await pool.in_use(name)
                        redis_peak[name] = max(redis_peak[name], live)
                        await asyncio.sleep(0.001)  # the upstream call, in miniature
                    finally:
                        in_use[name] -= 1
                finished += 1

            await asyncio.gather(*(one(i) for i in range(200)))
            assert await pools[0].in_use(ALPHA) == 0
            assert await pools[1].in_use(BETA) == 0

    run(main)
    assert finished == 200
    assert all(peak[name] <= limit for name, limit in limits.items()), peak
    assert all(redis_peak[name] <= limit for name, limit in limits.items()), redis_peak
    # There was contention: both keys were filled to their limit at some point.
    assert dict(peak) == limits


def test_a_pool_prefers_the_key_with_the_most_free_slots(redis_url: str) -> None:
    async def main() -> list[str]:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pool,
        ):
            names: list[str] = []
            async with pool.slot() as a, pool.slot() as b, pool.slot() as c, pool.slot() as d:
                names = [a.key.name, b.key.name, c.key.name, d.key.name]
                assert await pool.in_use(ALPHA) + await pool.in_use(BETA) == 4
            return names

    # alpha 3 free -> alpha; 2/2 -> alpha (first listed); 1/2 -> beta; 1/1 -> alpha
    assert run(main) == [ALPHA, ALPHA, BETA, ALPHA]


# --- (b) a dead holder's slot comes back ------------------------------------------------------


def test_a_lease_that_is_never_released_expires_and_the_slot_comes_back(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as dead_conn,
            connect(redis_url) as live_conn,
            KeyPool(dead_conn, api_keys(alpha=1), lease_s=0.3) as dead,
            KeyPool(live_conn, api_keys(alpha=1), lease_s=LEASE_S) as live,
        ):
            # A process that took the only slot and died without releasing it.
            assert await dead._try_acquire("dead-holder", None) == ("ok", ALPHA)
            dead_expiry_ms = await live_conn.zscore(slots_key(ALPHA), "dead-holder")
            assert dead_expiry_ms is not None

            assert await live._try_acquire("blocked", None) == ("wait", "-1")

            async with live.slot() as lease:
                assert lease.key.name == ALPHA
                # Granted only once the dead lease had expired, by Redis's clock.
                assert await redis_now_ms(live_conn) >= dead_expiry_ms
                members = await live_conn.zrange(slots_key(ALPHA), 0, -1)
                assert members == [lease.token.encode()]
            assert await live.in_use(ALPHA) == 0

    run(main, timeout_s=20)


def test_a_released_slot_is_free_at_once(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=1), lease_s=LEASE_S) as pool,
        ):
            async with pool.slot():
                assert await pool.in_use(ALPHA) == 1
                assert (await pool._try_acquire("other", None))[0] == "wait"
            assert await pool.in_use(ALPHA) == 0
            assert await pool._try_acquire("other", None) == ("ok", ALPHA)

    run(main)


def test_a_slot_is_released_when_the_block_raises(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=1), lease_s=LEASE_S) as pool,
        ):
            with pytest.raises(RuntimeError):
                async with pool.slot():
                    raise RuntimeError("the call failed")
            assert await pool.in_use(ALPHA) == 0

    run(main)


def test_a_taker_cancelled_while_its_attempt_is_in_flight_gives_the_slot_back(
    redis_url: str,
) -> None:
    """The script takes the slot in Redis whether or not the taker still waits for the
    answer; the answer that comes after the cancellation releases it."""

    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=1), lease_s=LEASE_S) as pool,
        ):
            async with pool.slot():  # the slot script's connection is dialled
                pass

            async def take() -> None:
                async with pool.slot():
                    raise AssertionError("the taker was cancelled before its answer")

            taker = asyncio.create_task(take())
            await asyncio.sleep(0)  # its attempt is written; the answer is not read yet
            taker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await taker
            deadline = time.monotonic() + 5
            while await pool.in_use(ALPHA) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert await pool.in_use(ALPHA) == 0

    run(main)


def test_a_process_takes_no_more_than_its_share_of_the_slots(redis_url: str) -> None:
    """One of several processes of a worker waits for its own slots, not for Redis."""

    async def main() -> None:
        async with (
            connect(redis_url) as client,
            ObservedPool(client, api_keys(alpha=2, beta=2), lease_s=LEASE_S, local_slots=1) as pool,
        ):

            async def in_use() -> int:
                return await pool.in_use(ALPHA) + await pool.in_use(BETA)

            async def second() -> int:
                async with pool.slot():
                    return await in_use()

            async with pool.slot():
                waiter = asyncio.create_task(second())
                while not pool._local.waiting(interactive=False):
                    await asyncio.sleep(0.005)
                assert await in_use() == 1  # three slots free in Redis, and yet it waits
                assert not pool.waited.is_set()  # ... without asking Redis
            assert await waiter == 1
            assert await in_use() == 0

    run(main)


class CountingPool(KeyPool):
    """A KeyPool that counts its slot-script attempts and its own lease releases (ZREM)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts = 0
        self.releases = 0
        zrem = self._redis.zrem

        async def counted_zrem(name: str, *values: Any) -> Any:
            if name.startswith(constants.REDIS_PREFIX + "slots:"):
                self.releases += 1
            return await zrem(name, *values)

        self._redis.zrem = counted_zrem  # type: ignore[method-assign]

    async def _try_acquire(self, token: str, job_id: str | None) -> tuple[str, str]:
        self.attempts += 1
        return await super()._try_acquire(token, job_id)


async def hold_with_one_queued(
    pool: KeyPool, taker: Callable[[], Awaitable[None]]
) -> tuple[asyncio.Event, asyncio.Task[None], asyncio.Task[None]]:
    """A holder on the pool's only slot (until the event is set), and `taker` queued in the
    process behind it; returns the event and both tasks once the taker waits."""
    done = asyncio.Event()

    async def hold() -> None:
        async with pool.slot():
            await done.wait()

    holder = asyncio.create_task(hold())
    while await pool.in_use(ALPHA) == 0:
        await asyncio.sleep(0.005)
    waiter = asyncio.create_task(taker())
    while not pool._local.waiting(interactive=False):
        await asyncio.sleep(0.005)
    return done, holder, waiter


def test_a_lease_handed_to_a_waiting_taker_is_released_by_its_attempt(redis_url: str) -> None:
    """One round trip per call while busy: the ending lease rides on the next attempt."""

    async def main() -> None:
        async with (
            connect(redis_url) as client,
            CountingPool(client, api_keys(alpha=1), lease_s=LEASE_S) as pool,
        ):
            second_got = asyncio.Event()

            async def second() -> None:
                async with pool.slot():
                    second_got.set()
                    await asyncio.sleep(0)

            first_done, holder, waiter = await hold_with_one_queued(pool, second)
            first_done.set()
            await second_got.wait()
            # The first lease went with the second's only attempt, not with a ZREM of its own.
            assert (pool.attempts, pool.releases) == (2, 0)
            assert await pool.in_use(ALPHA) == 1
            await asyncio.gather(holder, waiter)
            # No one waits any more: the last lease is released at once, by itself.
            assert pool.releases == 1
            assert await pool.in_use(ALPHA) == 0

    run(main)


def test_a_lease_handed_to_a_taker_cancelled_meanwhile_is_still_released(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            CountingPool(client, api_keys(alpha=1), lease_s=LEASE_S) as pool,
        ):

            async def second() -> None:
                async with pool.slot():
                    raise AssertionError("a cancelled taker got a slot")

            first_done, holder, waiter = await hold_with_one_queued(pool, second)
            # The holder ends while the waiter is still queued, then the waiter is cancelled
            # before it can make its attempt: the ended lease must not wait for its expiry.
            first_done.set()
            waiter.cancel()
            await holder
            with pytest.raises(asyncio.CancelledError):
                await waiter
            deadline = time.monotonic() + 2
            while await pool.in_use(ALPHA) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert await pool.in_use(ALPHA) == 0
            assert pool.releases == 1

    run(main)


def test_flush_releases_ended_leases_before_a_process_stops(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=2), lease_s=LEASE_S) as pool,
        ):
            token = "ended-elsewhere"
            assert await pool._try_acquire(token, None) == ("ok", ALPHA)
            pool._ended.append((ALPHA, token, ""))  # as a lease handed to a taker that never ran
            await pool.flush()
            assert await pool.in_use(ALPHA) == 0

    run(main)


# --- (c) pauses ----------------------------------------------------------------------------


def test_a_paused_key_gets_no_calls_until_the_pause_ends(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pool,
        ):
            await pool.pause(ALPHA, 1.0)
            assert 0 < await client.pttl(pause_key(ALPHA)) <= 1000

            beta_while_paused = 0
            while await client.pttl(pause_key(ALPHA)) > 0:
                async with pool.slot() as lease:
                    if lease.key.name == ALPHA:
                        # Only possible once the pause has no time left (PTTL 0 is its
                        # last millisecond, when the key still exists).
                        assert await client.pttl(pause_key(ALPHA)) <= 0
                    else:
                        beta_while_paused += 1
            assert beta_while_paused > 0

            # Pause over: alpha, with the most free slots, is chosen again.
            async with pool.slot() as lease:
                assert lease.key.name == ALPHA

    run(main, timeout_s=20)


def test_with_beta_full_a_call_waits_for_alphas_pause_to_end(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pool,
        ):
            await pool.pause(ALPHA, 1.0)
            # Two calls elsewhere hold both of beta's slots.
            assert await pool._try_acquire("beta-1", None) == ("ok", BETA)
            assert await pool._try_acquire("beta-2", None) == ("ok", BETA)
            outcome, wait_ms = await pool._try_acquire("probe", None)
            # Told to wait, and for no longer than the pause has left.
            assert outcome == "wait"
            assert 0 < int(wait_ms) <= 1000

            async with pool.slot() as lease:
                assert lease.key.name == ALPHA
                assert await client.pttl(pause_key(ALPHA)) <= 0
            assert await pool.in_use(BETA) == 2

    run(main, timeout_s=20)


def test_with_only_a_paused_key_a_call_waits_until_the_pause_ends(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=2), lease_s=LEASE_S) as pool,
        ):
            await pool.pause(ALPHA, 0.5)
            started = time.monotonic()
            remaining_ms = await client.pttl(pause_key(ALPHA))
            assert 0 < remaining_ms <= 500
            async with pool.slot() as lease:
                waited_s = time.monotonic() - started
                assert lease.key.name == ALPHA
                assert await client.pttl(pause_key(ALPHA)) <= 0
            # PTTL is whole milliseconds, rounded down; allow that and clock granularity.
            assert waited_s >= remaining_ms / 1000 - 0.005, (waited_s, remaining_ms)

    run(main, timeout_s=20)


def test_a_shorter_later_pause_does_not_shorten_a_longer_one(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=2), lease_s=LEASE_S) as pool,
        ):
            await pool.pause(ALPHA, 30)
            await pool.pause(ALPHA, 0.1)
            assert await client.pttl(pause_key(ALPHA)) > 29_000
            # A longer later pause does extend it.
            await pool.pause(ALPHA, 60)
            assert await client.pttl(pause_key(ALPHA)) > 59_000

    run(main)


def test_a_pause_is_seen_by_every_pool(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as one,
            connect(redis_url) as two,
            KeyPool(one, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pausing,
            KeyPool(two, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as other,
        ):
            await pausing.pause(ALPHA, 30)
            for _ in range(5):
                async with other.slot() as lease:
                    assert lease.key.name == BETA

    run(main)


# --- (d) keys out of use -------------------------------------------------------------------


def test_with_every_key_out_of_use_a_call_fails_naming_the_keys(redis_url: str) -> None:
    async def main() -> str:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pool,
        ):
            await pool.take_out_of_use(ALPHA, "HTTP 401 invalid key", None)
            await pool.take_out_of_use(BETA, "insufficient balance", 3600)
            with pytest.raises(errors.NoUsableKey) as caught:
                async with pool.slot():
                    pass
            assert await pool.in_use(ALPHA) == 0
            return str(caught.value)

    message = run(main, timeout_s=10)
    assert f"'{ALPHA}' (HTTP 401 invalid key)" in message
    assert f"'{BETA}' (insufficient balance)" in message
    assert all(secret not in message for secret in SECRETS.values())


def test_a_key_out_of_use_gets_no_calls_and_comes_back_when_its_time_is_up(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=3, beta=2), lease_s=LEASE_S) as pool,
        ):
            await pool.take_out_of_use(ALPHA, "daily quota", 0.3)
            revoked = constants.REVOKED_KEY.format(name=ALPHA)
            assert 0 < await client.pttl(revoked) <= 300
            while await client.exists(revoked):
                async with pool.slot() as lease:
                    if lease.key.name == ALPHA:
                        assert not await client.exists(revoked)
            async with pool.slot() as lease:
                assert lease.key.name == ALPHA

    run(main, timeout_s=20)


# --- (e) cancelled jobs ---------------------------------------------------------------------


def test_a_cancel_mark_stops_the_jobs_calls_only(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            KeyPool(client, api_keys(alpha=2), lease_s=LEASE_S) as pool,
        ):
            await client.set(constants.CANCELLED_JOB_KEY.format(job_id=job("job-1")), "1")
            with pytest.raises(errors.Cancelled):
                async with pool.slot(job("job-1")):
                    pytest.fail("a cancelled job got a slot")
            assert await pool.in_use(ALPHA) == 0
            async with pool.slot(job("job-2")) as lease:
                assert lease.key.name == ALPHA
            async with pool.slot() as lease:
                assert lease.key.name == ALPHA

    run(main)


def test_a_call_waiting_for_a_slot_is_cancelled_by_a_later_mark(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as one,
            connect(redis_url) as two,
            KeyPool(one, api_keys(alpha=1), lease_s=LEASE_S) as holder,
            ObservedPool(two, api_keys(alpha=1), lease_s=LEASE_S) as waiter,
        ):

            async def wait_for_slot() -> None:
                async with waiter.slot(job("job-9")):
                    pytest.fail("a cancelled job got a slot")

            async with holder.slot():
                task = asyncio.create_task(wait_for_slot())
                await waiter.waited.wait()
                await one.set(constants.CANCELLED_JOB_KEY.format(job_id=job("job-9")), "1")
                with pytest.raises(errors.Cancelled):
                    await task
                assert await holder.in_use(ALPHA) == 1

    run(main, timeout_s=20)
