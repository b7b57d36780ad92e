"""Per-key rpm, tpm and quotas in the real Redis, through KeyPool: what the slot script allows.

Key NAMEs carry a per-run suffix, as in test_key_limits.py, so other suites' workers on this
Redis database never meet this state. Windows are shortened to a second or two.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr
from test_key_limits import connect, run

from worker import constants, errors
from worker.settings import ApiKey
from worker.upstream.limits import KeyPool
from worker.upstream.token_estimate import learnt_ratio

LEASE_S = 30.0
RUN = uuid.uuid4().hex[:8]
ALPHA = f"alpha-{RUN}"
BETA = f"beta-{RUN}"
MODEL = f"model-{RUN}"
WINDOW_S = 1.0
WINDOW_MS = (WINDOW_S + constants.RATE_WINDOW_MARGIN_S) * 1000


def key(name: str, slots: int = 8, **limits: int) -> ApiKey:
    return ApiKey(name, SecretStr(f"sk-{name}"), slots, **limits)


def pool_of(client: aioredis.Redis, *keys: ApiKey) -> KeyPool:
    return KeyPool(client, keys, lease_s=LEASE_S, window_s=WINDOW_S)


async def token_sum(client: aioredis.Redis, name: str) -> int:
    raw = await client.hget(constants.RATE_TOKEN_AMOUNTS_KEY.format(name=name), "sum")
    return int(raw or 0)


def test_a_key_runs_its_whole_rpm_at_once_then_waits_for_the_window(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA, slots=8, rpm=5)) as pool,
        ):
            for i in range(5):
                assert await pool._try_acquire(f"t{i}", None) == ("ok", ALPHA)
            outcome, wait_ms = await pool._try_acquire("sixth", None)
            # Told how long until the first call leaves the window, not to poll.
            assert outcome == "wait"
            assert WINDOW_MS - 200 < int(wait_ms) <= WINDOW_MS
            started = time.monotonic()
            async with pool.slot() as lease:
                assert lease.key.name == ALPHA
                assert time.monotonic() - started >= int(wait_ms) / 1000 - 0.01

    run(main)


def test_a_call_counts_in_its_windows_from_when_it_ended(redis_url: str) -> None:
    """The upstream saw a call arrive at some moment before it ended, however late it was
    sent after taking its slot: its window entries move to its end, or the next window
    would open early by the call's delay and the upstream refuse."""

    async def main() -> None:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA, rpm=1, tpm=10_000)) as pool,
        ):
            calls = constants.RATE_CALLS_KEY.format(name=ALPHA)
            token_times = constants.RATE_TOKEN_TIMES_KEY.format(name=ALPHA)
            async with pool.slot(model=MODEL, estimated_tokens=100) as lease:
                taken_ms = await client.zscore(calls, lease.token)
                assert await client.zscore(token_times, lease.token) == taken_ms
                await asyncio.sleep(0.4)  # the call's own length, as a slow send would make it
                lease.billed_tokens = 120
            ended_ms = await client.zscore(calls, lease.token)
            assert ended_ms >= taken_ms + 400
            assert await client.zscore(token_times, lease.token) == ended_ms
            outcome, wait_ms = await pool._try_acquire("next", None)
            assert outcome == "wait"
            assert int(wait_ms) > WINDOW_MS - 200  # a whole window from the end, not the slot

    run(main)


def test_a_call_with_no_billed_figure_still_moves_to_its_end(redis_url: str) -> None:
    async def main() -> None:
        async with connect(redis_url) as client, pool_of(client, key(ALPHA, rpm=1)) as pool:
            calls = constants.RATE_CALLS_KEY.format(name=ALPHA)
            async with pool.slot() as lease:
                taken_ms = await client.zscore(calls, lease.token)
                await asyncio.sleep(0.2)  # the call's own length
            assert lease.billed_tokens is None
            assert await client.zscore(calls, lease.token) >= taken_ms + 200

    run(main)


def test_a_key_whose_window_is_full_is_passed_over_for_one_with_room(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA, slots=8, rpm=2), key(BETA, slots=2)) as pool,
        ):
            names = [(await pool._try_acquire(f"t{i}", None))[1] for i in range(4)]
            assert sorted(names) == [ALPHA, ALPHA, BETA, BETA]
            # Both of beta's slots are taken, alpha's window is full: a poll, not a long wait.
            assert await pool._try_acquire("fifth", None) == ("wait", "-1")

    run(main)


def test_tokens_are_reserved_from_the_estimate_and_settled_with_the_billed_figure(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with connect(redis_url) as client, pool_of(client, key(ALPHA, tpm=10_000)) as pool:
            factor = constants.TOKEN_RESERVE_FACTOR
            async with pool.slot(model=MODEL, estimated_tokens=1000) as lease:
                assert await token_sum(client, ALPHA) == round(1000 * factor)
                lease.billed_tokens = 2000
            # Settled: the window holds what was billed.
            assert await token_sum(client, ALPHA) == 2000
            async with pool.slot(model=MODEL, estimated_tokens=1000) as lease:
                # The ratio learnt 2 (sent with this take), and this call of the model
                # reserves its estimate x the learnt ratio.
                ratio = await client.hget(constants.TOKEN_RATIO_KEY, MODEL)
                assert float(ratio) == pytest.approx(2.0)
                assert await token_sum(client, ALPHA) == 2000 + round(2000 * factor)
                lease.billed_tokens = 0  # refused: nothing counted upstream
            assert await token_sum(client, ALPHA) == 2000

    run(main)


def test_a_window_of_only_refused_calls_passes_and_the_key_takes_calls_again(
    redis_url: str,
) -> None:
    """Calls refused with a 429 settle at 0 tokens; when only they leave the window, the
    script frees 0 tokens (once sent to Redis as "-0", which HINCRBY refused)."""

    async def main() -> None:
        async with connect(redis_url) as client, pool_of(client, key(ALPHA, tpm=3000)) as pool:
            for _ in range(2):
                async with pool.slot(model=MODEL, estimated_tokens=1000) as lease:
                    lease.billed_tokens = 0
            await asyncio.sleep(WINDOW_MS / 1000)  # the window itself is what is tested
            async with pool.slot(model=MODEL, estimated_tokens=1000) as lease:
                assert lease.key.name == ALPHA
                lease.billed_tokens = 900
            assert await token_sum(client, ALPHA) == 900

    run(main)


def test_a_call_that_does_not_fit_the_token_window_waits_until_enough_leaves(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with connect(redis_url) as client, pool_of(client, key(ALPHA, tpm=3000)) as pool:
            for _ in range(2):
                async with pool.slot(model=MODEL, estimated_tokens=1000) as lease:
                    lease.billed_tokens = 1400
            assert await pool._try_acquire("small", None) == ("ok", ALPHA)  # 0 tokens fit
            pool._asks["big"] = (MODEL, 1000)  # as a waiting taker of 1000 x 1.4 tokens
            outcome, wait_ms = await pool._try_acquire("big", None)
            assert outcome == "wait"
            assert 0 < int(wait_ms) <= WINDOW_MS
            started = time.monotonic()
            async with pool.slot(model=MODEL, estimated_tokens=1000):
                assert time.monotonic() - started >= int(wait_ms) / 1000 - 0.01

    run(main)


def test_a_key_at_its_daily_quota_is_out_of_use_and_the_other_carries_on(
    redis_url: str,
) -> None:
    async def main() -> str:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA, daily_tokens=1500), key(BETA, slots=1)) as pool,
        ):
            async with pool.slot(model=MODEL, estimated_tokens=100) as lease:
                assert lease.key.name == ALPHA
                lease.billed_tokens = 1600
            assert await pool.quota_used(ALPHA) == (1600, 1600)
            for _ in range(3):
                async with pool.slot() as lease:
                    assert lease.key.name == BETA
            await pool.take_out_of_use(BETA, "HTTP 401 invalid key", None)
            with pytest.raises(errors.NoUsableKey) as caught:
                async with pool.slot():
                    pass
            return str(caught.value)

    message = run(main)
    today = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert f"key '{ALPHA}' reached its daily quota of 1,500 tokens until {today}T00:00Z" in message
    assert f"'{BETA}' (HTTP 401 invalid key)" in message


def test_a_monthly_quota_is_counted_and_named_likewise(redis_url: str) -> None:
    async def main() -> str:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA, monthly_tokens=10)) as pool,
        ):
            async with pool.slot(model=MODEL, estimated_tokens=5) as lease:
                lease.billed_tokens = 10
            with pytest.raises(errors.NoUsableKey) as caught:
                async with pool.slot():
                    pass
            return str(caught.value)

    assert f"key '{ALPHA}' reached its monthly quota of 10 tokens until " in run(main)


def test_rate_state_is_shared_by_pools_on_separate_connections(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as one,
            connect(redis_url) as two,
            pool_of(one, key(ALPHA, rpm=3)) as first,
            pool_of(two, key(ALPHA, rpm=3)) as second,
        ):

            async def take(pool: KeyPool) -> float:
                async with pool.slot():
                    return time.monotonic()

            started = time.monotonic()
            times = await asyncio.gather(*(take((first, second)[i % 2]) for i in range(6)))
            late = sorted(t - started for t in times)
            assert late[2] < WINDOW_S / 2  # three at once
            assert late[3] >= WINDOW_MS / 1000 - 0.05  # the next three a window later

    run(main)


def test_the_ratio_learns_from_every_key_and_a_flush_sends_what_is_left(redis_url: str) -> None:
    async def main() -> None:
        async with (
            connect(redis_url) as client,
            pool_of(client, key(ALPHA)) as pool,
        ):  # no window, no quota: a plain key
            async with pool.slot(model=MODEL, estimated_tokens=100) as lease:
                lease.billed_tokens = 300
            assert await client.hget(constants.TOKEN_RATIO_KEY, MODEL) is None  # not yet sent
            await pool.flush()
            ratio = float(await client.hget(constants.TOKEN_RATIO_KEY, MODEL))
            assert ratio == pytest.approx(3.0)
            async with pool.slot(model=MODEL, estimated_tokens=100) as lease:
                lease.billed_tokens = 100
            await pool.flush()
            # An EWMA: a step of the weight towards the new observation (1).
            ratio = float(await client.hget(constants.TOKEN_RATIO_KEY, MODEL))
            assert ratio == pytest.approx(3.0 + constants.TOKEN_RATIO_ALPHA * (1.0 - 3.0))
            sync = redis.Redis.from_url(redis_url)
            try:
                assert learnt_ratio(sync, MODEL) == pytest.approx(ratio)
                assert learnt_ratio(sync, "never-seen") is None
            finally:
                sync.close()

    run(main)
