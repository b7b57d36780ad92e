"""The budget script on a real Redis: concurrent reservations cannot pass a cap together,
and a job's spend is seeded from SQL's figure when Redis has none."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from worker import errors
from worker.domain import JobBudget
from worker.upstream.budget import JobBudgets, Reservation
from worker.upstream.token_estimate import estimate_tokens

DOCUMENTS = ['"some document text"'] * 4


async def reserve_many(url: str, budget: JobBudget, callers: int) -> tuple[int, int]:
    client = aioredis.Redis.from_url(url)
    budgets = JobBudgets(client)
    try:

        async def one() -> bool:
            try:
                await budgets.reserve("job", "m", budget, "query", DOCUMENTS)
            except errors.BudgetExceeded:
                return False
            return True

        admitted = sum(await asyncio.gather(*(one() for _ in range(callers))))
        spent = int(await client.hget("rerank:budget:job", "spent_tokens") or 0)
    finally:
        await client.aclose()
    return admitted, spent


def test_concurrent_reservations_stop_at_the_cap(redis_url: str) -> None:
    per_call = estimate_tokens("m", DOCUMENTS, "query")
    cap = per_call * 10 - 1
    budget = JobBudget(max_tokens=cap, max_cost=None, price_per_million_tokens=None,
                       price_per_search_unit=None)  # fmt: skip
    admitted, spent = asyncio.run(reserve_many(redis_url, budget, 50))
    # Admitted while spent + reserved < cap: the last one may pass it by one call at most.
    assert admitted == 10
    assert spent == 0


def test_the_spend_is_seeded_from_sql_when_redis_has_none(redis_url: str) -> None:
    budget = JobBudget(max_tokens=1000, max_cost=None, price_per_million_tokens=None,
                       price_per_search_unit=None, spent_tokens=1000)  # fmt: skip
    admitted, spent = asyncio.run(reserve_many(redis_url, budget, 3))
    assert (admitted, spent) == (0, 1000)


def test_a_settled_call_replaces_its_reservation(redis_url: str) -> None:
    async def run() -> dict[bytes, bytes]:
        client = aioredis.Redis.from_url(redis_url)
        budgets = JobBudgets(client)
        budget = JobBudget(max_tokens=10**6, max_cost=None, price_per_million_tokens=1000.0,
                           price_per_search_unit=None)  # fmt: skip
        reservation = await budgets.reserve("job", "m", budget, "query", DOCUMENTS)
        await budgets.settle(reservation, 7, 0.007)
        state = await client.hgetall("rerank:budget:job")
        await client.aclose()
        return dict(state)

    state = asyncio.run(run())
    assert int(state[b"spent_tokens"]) == 7 and int(state[b"reserved_tokens"]) == 0
    assert float(state[b"spent_cost"]) == pytest.approx(0.007)
    assert float(state[b"reserved_cost"]) == pytest.approx(0.0, abs=1e-12)


def test_a_reservation_of_nothing_settles_too(redis_url: str) -> None:
    """A zero reservation is given back as 0, not as "-0" (which HINCRBY refuses)."""

    async def run() -> dict[bytes, bytes]:
        client = aioredis.Redis.from_url(redis_url)
        budgets = JobBudgets(client)
        await client.hset("rerank:budget:zero", mapping={"spent_tokens": 0, "reserved_tokens": 0})
        await budgets.settle(Reservation("zero", 0, 0.0), 5, 0.0)
        state = await client.hgetall("rerank:budget:zero")
        await client.delete("rerank:budget:zero")
        await client.aclose()
        return dict(state)

    state = asyncio.run(run())
    assert int(state[b"spent_tokens"]) == 5 and int(state[b"reserved_tokens"]) == 0
