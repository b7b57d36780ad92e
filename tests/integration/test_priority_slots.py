"""Interactive before bulk at the shared slots, on the real Redis: two KeyPools with their own
connections, as two worker processes would have.

The pools use a per-run Redis prefix, so the gate set of interactive waiters is this test's
own and workers of other suites on the same database neither see it nor fill it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from pydantic import SecretStr

from worker import constants
from worker.settings import ApiKey
from worker.upstream.limits import KeyPool

LEASE_S = 30.0
PREFIX = f"rerank-test-{uuid.uuid4().hex[:8]}:"
GATE = PREFIX + constants.INTERACTIVE_WAITERS_KEY.removeprefix(constants.REDIS_PREFIX)


def keys(slots: int) -> list[ApiKey]:
    return [ApiKey("alpha", SecretStr("sk-test-alpha-0123456789abcdef"), slots)]


def run(main: Callable[[], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await main()

    return asyncio.run(bounded())


@asynccontextmanager
async def pools(redis_url: str, slots: int, count: int) -> AsyncIterator[list[KeyPool]]:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(count)]
    made = [KeyPool(c, keys(slots), lease_s=LEASE_S, prefix=PREFIX) for c in clients]
    try:
        yield made
    finally:
        for pool, client in zip(made, clients, strict=True):
            await pool.aclose()
            await client.aclose()


async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll until true; the run's timeout is the deadline."""
    while not await predicate():
        await asyncio.sleep(0.005)


async def redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Taker:
    """Takes a slot of `pool` and holds it until `done` is set; notes when it got it."""

    def __init__(self, pool: KeyPool, priority: str, got: list[str], name: str) -> None:
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._hold(pool, priority, got, name))

    async def _hold(self, pool: KeyPool, priority: str, got: list[str], name: str) -> None:
        async with pool.slot(priority=priority):
            got.append(name)
            await self.done.wait()

    async def finish(self) -> None:
        self.done.set()
        await self.task


def observe_bulk_waits(pool: KeyPool, bulk_waits: asyncio.Event) -> None:
    """Make `pool`'s bulk attempts set `bulk_waits` when refused."""
    attempt = pool._try_acquire

    async def observed(token: str, job_id: str | None) -> tuple[str, str]:
        outcome = await attempt(token, job_id)
        if outcome[0] == "wait":
            bulk_waits.set()
        return outcome

    pool._try_acquire = observed  # type: ignore[method-assign]


def test_a_freed_slot_goes_to_the_interactive_waiter_of_another_process(redis_url: str) -> None:
    async def main() -> list[str]:
        async with pools(redis_url, slots=1, count=3) as (holder_pool, bulk_pool, fast_pool):
            got: list[str] = []
            holder = Taker(holder_pool, constants.QUEUE_BULK, got, "holder")
            await until(lambda: _true(got == ["holder"]))
            bulk_waits = asyncio.Event()
            observe_bulk_waits(bulk_pool, bulk_waits)
            bulk = Taker(bulk_pool, constants.QUEUE_BULK, got, "bulk")
            await bulk_waits.wait()
            interactive = Taker(fast_pool, constants.QUEUE_INTERACTIVE, got, "interactive")
            client = fast_pool._redis
            await until(lambda: _gate_size(client, 1))
            await holder.finish()
            await until(lambda: _true(len(got) == 2))
            assert await client.zcard(GATE) == 0  # it left the gate with its slot
            await interactive.finish()
            await until(lambda: _true(len(got) == 3))
            await bulk.finish()
            return got

    assert run(main) == ["holder", "interactive", "bulk"]


def test_bulk_takers_still_get_the_free_slots_beyond_the_interactive_waiters(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with pools(redis_url, slots=2, count=2) as (bulk_pool, fast_pool):
            client = fast_pool._redis
            # An interactive taker is waiting (it was told so a moment ago).
            assert await bulk_pool._try_acquire("full-1", None) == ("ok", "alpha")
            assert await bulk_pool._try_acquire("full-2", None) == ("ok", "alpha")
            assert (await fast_pool._try_acquire_interactive("fast", None))[0] == "wait"
            assert await client.zcard(GATE) == 1
            await client.zrem(PREFIX + "slots:alpha", "full-1", "full-2")
            # Two free slots, one interactive waiter: bulk may take one, not both.
            assert await bulk_pool._try_acquire("bulk-1", None) == ("ok", "alpha")
            assert (await bulk_pool._try_acquire("bulk-2", None))[0] == "wait"
            assert await fast_pool._try_acquire_interactive("fast", None) == ("ok", "alpha")
            assert await client.zcard(GATE) == 0

    run(main)


def test_an_interactive_waiter_that_gives_up_stops_holding_bulk_back(redis_url: str) -> None:
    async def main() -> None:
        async with pools(redis_url, slots=1, count=2) as (bulk_pool, fast_pool):
            client = bulk_pool._redis
            assert await bulk_pool._try_acquire("holder", None) == ("ok", "alpha")
            got: list[str] = []
            interactive = Taker(fast_pool, constants.QUEUE_INTERACTIVE, got, "interactive")
            await until(lambda: _gate_size(client, 1))
            interactive.task.cancel()
            await asyncio.gather(interactive.task, return_exceptions=True)
            assert await client.zcard(GATE) == 0
            await client.zrem(PREFIX + "slots:alpha", "holder")
            assert await bulk_pool._try_acquire("bulk", None) == ("ok", "alpha")
            assert got == []

    run(main)


def test_a_dead_interactive_waiters_hold_on_bulk_expires(redis_url: str) -> None:
    async def main() -> None:
        async with pools(redis_url, slots=1, count=2) as (bulk_pool, dead_pool):
            client = bulk_pool._redis
            assert await bulk_pool._try_acquire("holder", None) == ("ok", "alpha")
            # Told to wait once, then its process died: it never attempts again.
            assert (await dead_pool._try_acquire_interactive("dead", None))[0] == "wait"
            dead_expiry_ms = await client.zscore(GATE, "dead")
            assert dead_expiry_ms is not None
            await client.zrem(PREFIX + "slots:alpha", "holder")
            assert (await bulk_pool._try_acquire("bulk", None))[0] == "wait"
            async with bulk_pool.slot() as lease:
                assert lease.key.name == "alpha"
                # Granted only once the dead waiter's entry had expired, by Redis's clock.
                assert await redis_now_ms(client) >= dead_expiry_ms

    run(main)


async def _gate_size(client: aioredis.Redis, size: int) -> bool:
    return bool(await client.zcard(GATE) == size)


async def _true(value: object) -> bool:
    return bool(value)
