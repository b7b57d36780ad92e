"""Job budgets, shared by every worker process and host, kept in Redis.

A call of a job with a cap is reserved before it starts and settled when it ends, each in
one Lua script on the job's hash (spent and reserved tokens and cost): a call starts only
while spent + reserved is below every cap, and its answer replaces its reservation with
what it billed. Checking before and adding after, as separate steps, lets concurrent calls
all pass the check (LiteLLM #34732, #26672); here a job bills at most its cap plus what
its calls in flight when the cap was reached add.

The hash is seeded from SQL's figures the first time a call of the job meets none (a first
run, a Redis that lost its state); from then on Redis is ahead of SQL, which records calls
in batches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis

from worker import constants, errors
from worker.domain import JobBudget
from worker.upstream import token_estimate

RESERVE_LUA = """
local budget = KEYS[1]
if redis.call('EXISTS', budget) == 0 then
  redis.call('HSET', budget, 'spent_tokens', ARGV[5], 'spent_cost', ARGV[6],
             'reserved_tokens', 0, 'reserved_cost', 0)
end
local v = redis.call('HMGET', budget, 'spent_tokens', 'spent_cost', 'reserved_tokens',
                     'reserved_cost')
local spent_tokens, spent_cost = tonumber(v[1]), tonumber(v[2])
local reserved_tokens, reserved_cost = tonumber(v[3]), tonumber(v[4])
redis.call('EXPIRE', budget, tonumber(ARGV[7]))
if ARGV[1] ~= '' and spent_tokens + reserved_tokens >= tonumber(ARGV[1]) then
  return {'tokens', tostring(spent_tokens), tostring(reserved_tokens)}
end
if ARGV[2] ~= '' and spent_cost + reserved_cost >= tonumber(ARGV[2]) then
  return {'cost', tostring(spent_cost), tostring(reserved_cost)}
end
redis.call('HINCRBY', budget, 'reserved_tokens', ARGV[3])
redis.call('HINCRBYFLOAT', budget, 'reserved_cost', ARGV[4])
return {'ok', '', ''}
"""

# The reservation goes (ARGV 1-2, negated by the caller: a Lua -0 would reach Redis as "-0",
# which HINCRBY refuses), the billed figure comes, in one step. A hash that is gone (Redis
# lost it) is left alone: the next reservation seeds it from SQL, which has this call.
SETTLE_LUA = """
local budget = KEYS[1]
if redis.call('EXISTS', budget) == 0 then return 0 end
redis.call('HINCRBY', budget, 'reserved_tokens', ARGV[1])
redis.call('HINCRBYFLOAT', budget, 'reserved_cost', ARGV[2])
redis.call('HINCRBY', budget, 'spent_tokens', ARGV[3])
redis.call('HINCRBYFLOAT', budget, 'spent_cost', ARGV[4])
return 1
"""


@dataclass(frozen=True)
class Reservation:
    job_id: str
    tokens: int
    cost: float


class JobBudgets:
    def __init__(self, redis: aioredis.Redis, prefix: str = constants.REDIS_PREFIX) -> None:
        self._prefix = prefix
        self._reserve = redis.register_script(RESERVE_LUA)
        self._settle = redis.register_script(SETTLE_LUA)
        self._settling: set[asyncio.Task[None]] = set()

    def _key(self, job_id: str) -> str:
        return self._prefix + f"budget:{job_id}"

    async def reserve(
        self, job_id: str, model: str, budget: JobBudget, query: str, documents_json: list[str]
    ) -> Reservation:
        """Reserve one call's estimated tokens and cost; BudgetExceeded when a cap is reached."""
        if budget.max_cost is not None and not budget.priced:
            raise errors.BudgetExceeded(
                f"the job's cost cap ({budget.max_cost:g}) cannot be kept: model {model} has "
                "no price (set one with `rerank-worker prices set`)"
            )
        estimated = token_estimate.estimate_tokens(model, documents_json, query)
        cost = budget.cost(estimated, token_estimate.estimate_search_units(len(documents_json)))
        answer = await self._reserve(
            keys=[self._key(job_id)],
            args=[
                "" if budget.max_tokens is None else budget.max_tokens,
                "" if budget.max_cost is None else repr(budget.max_cost),
                estimated,
                repr(cost),
                budget.spent_tokens,
                repr(budget.spent_cost),
                constants.BUDGET_TTL_S,
            ],
        )
        refused, spent, reserved = (_text(part) for part in answer)
        if refused == "tokens":
            raise errors.BudgetExceeded(
                f"the job's token cap (--max-tokens {budget.max_tokens}) is reached: {spent} "
                f"tokens billed, {reserved} more in calls in flight"
            )
        if refused == "cost":
            raise errors.BudgetExceeded(
                f"the job's cost cap (--max-cost {budget.max_cost:g}) is reached: "
                f"{float(spent):.6f} billed, {float(reserved):.6f} more in calls in flight"
            )
        return Reservation(job_id, estimated, cost)

    async def settle(
        self, reservation: Reservation, billed_tokens: int, billed_cost: float
    ) -> None:
        await self._settle(
            keys=[self._key(reservation.job_id)],
            args=[
                -reservation.tokens,
                repr(-reservation.cost),
                billed_tokens,
                repr(billed_cost),
            ],
        )

    def settle_soon(self, reservation: Reservation) -> None:
        """For a call cut short (its task cancelled): the upstream may have billed it, so
        its estimate stays spent, settled in the background."""
        task = asyncio.get_running_loop().create_task(
            self.settle(reservation, reservation.tokens, reservation.cost)
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)


def billed_cost(budget: JobBudget, billed_tokens: int, search_units: int) -> float:
    return budget.cost(billed_tokens, search_units) if budget.priced else 0.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
