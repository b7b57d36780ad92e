"""An upstream that fails, a request that keeps killing its worker, and the shared key pool
after Redis lost its state.

Jobs run on real workers against the stand-in with injected faults: every request still
succeeds, exactly, within every key's limit, with no call inside a 429's pause, and usage
equals what the upstream billed. A request that cannot succeed fails with its last error and
its job still completes. The key pool tests drive two `KeyPool`s directly on a Redis this test
owns, restarting it between their calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from conftest import PAUSE_GRACE_MS, SECRETS, Env, OwnRedis, api_keys
from jobs_support import expected_results, make_requests, results_of, submit, wait_ok, write_jsonl
from pydantic import SecretStr
from sqlalchemy import text

from worker import constants, redis_clients
from worker.db.session import get_engine
from worker.runtime import SqlEpochWitness
from worker.settings import ApiKey
from worker.standin import ThreadedStandin
from worker.upstream.limits import KeyPool

DEFAULT_LIMITS = {"alpha": 3, "beta": 2}  # make_env's keys


def job_status(env: Env, job_id: str) -> dict[str, Any]:
    done = env.cli("status", job_id, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def assert_limits_held(stats: dict[str, Any], limits: dict[str, int]) -> dict[str, int]:
    peaks = {name: stats["keys"][name]["max_in_flight"] for name in limits}
    print(f"stand-in max_in_flight per key: {peaks} (limits {limits})")
    assert all(peaks[name] <= limit for name, limit in limits.items()), (peaks, limits)
    return peaks


# ------------------------------------------------------------------------- faults, whole jobs


@pytest.mark.slow
def test_thirty_percent_mixed_faults_every_request_succeeds_exactly_within_limits(
    database_url: str, make_env: Any, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, RERANK_CALL_TIMEOUT_S="1", RERANK_MAX_ATTEMPTS="12")
    standin.update(
        latency_ms=20,
        fault_429=0.08,
        fault_5xx=0.1,
        fault_drop=0.06,
        fault_slow=0.06,
        slow_ms=3000,  # past the 1 s call timeout: the client gives up on these
        retry_after_s=0.6,
        pause_grace_ms=PAUSE_GRACE_MS,
    )
    requests = make_requests(60)
    path = write_jsonl(tmp_path / "requests.jsonl", requests)
    env.start_worker(concurrency=4, name="one")
    env.start_worker(concurrency=4, name="two")
    job_id = submit(env, path)
    wait_ok(env, job_id, timeout_s=90)

    lines = results_of(env, job_id)
    not_ok = [line for line in lines if line["status"] != "succeeded"]
    assert not not_ok, not_ok[:3]
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]

    stats = standin.stats()
    total = stats["total"]
    print(f"stand-in totals: {total}")
    # Every kind of fault happened, or the run proves less than it claims.
    assert total["status_counts"].get("429", 0) > 0
    assert sum(total["status_counts"].get(s, 0) for s in ("500", "502", "503")) > 0
    assert total["drops"] > 0
    assert total["slow"] > 0 and total["client_closed"] >= total["slow"]
    assert total["calls_during_pause"] == 0
    peaks = assert_limits_held(stats, DEFAULT_LIMITS)
    assert peaks["alpha"] >= 2, "alpha was never used concurrently: the limit proves nothing"
    usage = json.loads(env.cli("usage", "--job", job_id, "--json").stdout)
    assert usage["total_tokens"] == total["tokens_billed"]
    assert sum(line["usage"]["total_tokens"] for line in lines) == total["tokens_billed"]
    status = job_status(env, job_id)
    assert (status["status"], status["succeeded"], status["failed"]) == ("completed", 60, 0)


def test_a_request_that_exhausts_its_attempts_fails_with_its_last_error_and_the_job_completes(
    postgres_url: str, make_env: Any, standin: ThreadedStandin, tmp_path: Path
) -> None:
    """Every answer is a 429 with Retry-After: each request makes exactly RERANK_MAX_ATTEMPTS
    calls, none of them inside a pause, then fails as rate limited."""
    attempts = 3
    env: Env = make_env(postgres_url, RERANK_MAX_ATTEMPTS=str(attempts))
    standin.update(fault_429=1.0, retry_after_s=0.5, pause_grace_ms=PAUSE_GRACE_MS, latency_ms=10)
    requests = make_requests(6)
    env.start_worker(concurrency=2)
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id, timeout_s=60)

    lines = results_of(env, job_id)
    assert {line["status"] for line in lines} == {"failed"}
    for line in lines:
        assert line["error"]["type"] == "rate_limited", line
        assert "429" in line["error"]["message"], line
        assert f"after {attempts} attempts" in line["error"]["message"], line
        assert line["results"] == []
    status = job_status(env, job_id)
    assert (status["status"], status["total"], status["succeeded"], status["failed"]) == (
        "completed", 6, 0, 6,
    )  # fmt: skip
    total = standin.stats()["total"]
    assert total["calls"] == attempts * len(requests)
    assert total["calls_during_pause"] == 0
    assert_limits_held(standin.stats(), DEFAULT_LIMITS)


def test_a_poison_request_is_failed_without_a_call_and_the_job_completes(
    database_url: str, make_env: Any, standin: ThreadedStandin, tmp_path: Path
) -> None:
    """A request already delivered MAX_DELIVERIES times (it killed its workers) is failed as
    poison on its next delivery, never sent upstream; the rest of its job runs normally."""
    env: Env = make_env(database_url)
    requests = make_requests(10)
    poison_id = requests[3]["custom_id"]
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))  # no worker yet
    with get_engine(database_url).begin() as connection:
        changed = connection.execute(
            text(
                "UPDATE request SET deliveries = :n "
                "WHERE job_id = :job AND custom_id = :cid AND status = 'queued'"
            ),
            {"n": constants.MAX_DELIVERIES, "job": job_id, "cid": poison_id},
        ).rowcount
    assert changed == 1
    env.start_worker(concurrency=2)
    wait_ok(env, job_id, timeout_s=60)

    lines = results_of(env, job_id)
    by_id = {line["custom_id"]: line for line in lines}
    poisoned = by_id.pop(poison_id)
    assert poisoned["status"] == "failed"
    assert poisoned["error"]["type"] == "poison"
    assert poisoned["results"] == []
    expected = {r["custom_id"]: expected_results(r) for r in requests}
    for custom_id, line in by_id.items():
        assert line["status"] == "succeeded", line
        assert line["results"] == expected[custom_id], custom_id
    status = job_status(env, job_id)
    assert (status["status"], status["total"], status["succeeded"], status["failed"]) == (
        "completed", 10, 9, 1,
    )  # fmt: skip
    assert standin.stats()["total"]["calls"] == 9  # the poison request was never sent


def test_requests_running_longer_than_their_lease_are_renewed_and_called_once(
    postgres_url: str, make_env: Any, standin: ThreadedStandin, tmp_path: Path
) -> None:
    """A slow upstream (one slot, steady answers) keeps one message's requests in a worker
    for several request leases: the worker renews them, so the sweeper never hands them to
    the other worker and no request is called twice."""
    lease_s = 2.0
    per_task = constants.REQUESTS_PER_TASK[constants.QUEUE_BULK]
    count = per_task  # one message: one task holds every request
    latency_ms = max(50, int(2.5 * lease_s * 1000 / count))  # the task lasts ~2.5 leases
    env: Env = make_env(
        postgres_url,
        api_keys(alpha=1),
        RERANK_REQUEST_LEASE_S=str(lease_s),
        RERANK_SWEEP_INTERVAL_S="0.3",
    )
    standin.update(latency_ms=latency_ms)
    requests = make_requests(count)
    env.start_worker(concurrency=1, name="one")
    env.start_worker(concurrency=1, name="two")
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id, timeout_s=60)

    lines = results_of(env, job_id)
    assert [line["results"] for line in lines] == [expected_results(r) for r in requests]
    total = standin.stats()["total"]
    assert total["ok"] == count, f"{total['ok']} calls for {count} requests"
    assert "action=sweep_requeue" not in env.all_logs()


# ------------------------------------------------------------- the key pool and a lost Redis

POOL_LEASE_S = 3.0
# A holder's call ends within its lease (the lease is the call timeout plus a margin).
HOLD_S = POOL_LEASE_S * 0.6


class SlotLedger:
    """Slots actually held, counted by the test across pools (Redis may have forgotten)."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0
        self.ended_at: list[float] = []  # loop times at which holds began to end

    @asynccontextmanager
    async def hold(self, pool: KeyPool) -> AsyncIterator[float]:
        async with pool.slot() as lease:
            assert lease.key.name == "alpha"
            self.held += 1
            self.peak = max(self.peak, self.held)
            try:
                yield asyncio.get_running_loop().time()
            finally:
                self.held -= 1
                self.ended_at.append(asyncio.get_running_loop().time())


class ObservedPool(KeyPool):
    """A KeyPool that says when it has been told to wait for a slot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.told_to_wait = asyncio.Event()

    async def _try_acquire(self, token: str, job_id: str | None) -> tuple[str, str]:
        outcome = await super()._try_acquire(token, job_id)
        if outcome[0] == "wait":
            self.told_to_wait.set()
        return outcome


def alpha_of_2() -> list[ApiKey]:
    return [ApiKey("alpha", SecretStr(SECRETS["alpha"]), 2)]


async def hold_two_then_restart(
    own_redis: OwnRedis,
    ledger: SlotLedger,
    holder: KeyPool,
    stack: AsyncExitStack,
    persist: bool,
    witness: SqlEpochWitness | None = None,
) -> float:
    """`holder` takes both of alpha's slots, then Redis restarts; returns when they were taken.
    With a witness, the restart waits until the epoch the holder saw is in the database."""
    taken = await stack.enter_async_context(ledger.hold(holder))
    await stack.enter_async_context(ledger.hold(holder))
    if witness is not None:
        async with asyncio.timeout(10):
            while await asyncio.to_thread(witness.last_seen) is None:
                await asyncio.sleep(0.01)
    await asyncio.to_thread(own_redis.restart, persist)
    return taken


async def second_pool_waits_for_the_holder(
    own_redis: OwnRedis,
    *,
    persist: bool,
    other_acquired_before: bool,
    witness: SqlEpochWitness | None = None,
) -> dict[str, Any]:
    """Pool A holds alpha@2's two slots across a Redis restart, and ends its calls within
    their lease; pool B asks for a slot after the restart. Returns what the test saw."""
    ledger = SlotLedger()
    loop = asyncio.get_running_loop()
    # The engine's own client: a pooled connection that the restart closed is dialled anew.
    client_a = redis_clients.async_redis(own_redis.url)
    client_b = redis_clients.async_redis(own_redis.url)
    try:
        async with (
            KeyPool(client_a, alpha_of_2(), lease_s=POOL_LEASE_S, witness=witness) as a,
            ObservedPool(client_b, alpha_of_2(), lease_s=POOL_LEASE_S, witness=witness) as b,
        ):
            if other_acquired_before:
                async with ledger.hold(b):  # B has seen the epoch
                    pass
            async with AsyncExitStack() as a_slots:
                taken = await hold_two_then_restart(own_redis, ledger, a, a_slots, persist, witness)
                restarted = loop.time()
                got_slot = asyncio.Event()

                async def take_one() -> float:
                    async with ledger.hold(b) as at:
                        got_slot.set()
                        return at

                b_task = asyncio.create_task(take_one())
                # A's calls go on until HOLD_S after they took their slots, as a real call ends
                # within its timeout, unless B already (wrongly) got a slot.
                async with asyncio.timeout(30):
                    while not (b.told_to_wait.is_set() or got_slot.is_set()):
                        await asyncio.sleep(0.01)
                remaining = taken + HOLD_S - loop.time()
                if remaining > 0:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(got_slot.wait(), remaining)
                ended_before = len(ledger.ended_at)
            # A's first slot to go frees one: B may take it while A releases its other one.
            released = ledger.ended_at[ended_before]
            granted = await asyncio.wait_for(b_task, POOL_LEASE_S + 10)
            redis_count = await b.in_use("alpha")
            return {
                "peak": ledger.peak,
                "restarted": restarted,
                "released": released,
                "granted": granted,
                "redis_count_after": redis_count,
            }
    finally:
        await client_a.aclose()
        await client_b.aclose()


def test_key_pool_after_redis_lost_its_state_waits_out_the_quarantine(
    own_redis: OwnRedis,
) -> None:
    seen = asyncio.run(
        second_pool_waits_for_the_holder(own_redis, persist=False, other_acquired_before=True)
    )
    assert seen["peak"] <= 2, f"{seen['peak']} slots of alpha@2 in use at once"
    assert seen["granted"] >= seen["released"], "B got a slot while A still held both"
    # ... and B is not kept waiting much past the quarantine of one lease.
    assert seen["granted"] - seen["restarted"] <= POOL_LEASE_S + 2
    assert seen["redis_count_after"] == 0


def test_key_pool_after_redis_restarted_with_its_data_keeps_leases_and_needs_no_quarantine(
    own_redis: OwnRedis,
) -> None:
    seen = asyncio.run(
        second_pool_waits_for_the_holder(own_redis, persist=True, other_acquired_before=True)
    )
    assert seen["peak"] <= 2, f"{seen['peak']} slots of alpha@2 in use at once"
    assert seen["granted"] >= seen["released"], "B got a slot while A still held both"
    # The leases survived, so A's releases free the slots at once: no quarantine.
    assert seen["granted"] - seen["released"] < 1.0


def test_key_pool_new_after_redis_lost_its_state_still_respects_slots_taken_before(
    own_redis: OwnRedis, sqlite_url: str
) -> None:
    """A worker that acquires for the first time after an empty restart finds no epoch in
    Redis. The database's witness tells it the epoch before, so it waits out the quarantine:
    A's two calls, still inside their lease, are not joined by a third on alpha@2."""
    seen = asyncio.run(
        second_pool_waits_for_the_holder(
            own_redis,
            persist=False,
            other_acquired_before=False,
            witness=SqlEpochWitness(sqlite_url),
        )
    )
    assert seen["peak"] <= 2, f"{seen['peak']} slots of alpha@2 in use at once"
    assert seen["granted"] >= seen["released"], "B got a slot while A still held both"
    assert seen["granted"] - seen["restarted"] <= POOL_LEASE_S + 2


def test_key_pool_slots_released_after_redis_restarted_with_its_data_are_free_at_once(
    own_redis: OwnRedis,
) -> None:
    """Redis is back up when the holder releases: nothing stops the release, so both slots
    must be free at once, not one lease (call timeout + 5 s) later."""

    async def main() -> int:
        client = redis_clients.async_redis(own_redis.url)
        try:
            async with KeyPool(client, alpha_of_2(), lease_s=60) as pool:
                async with pool.slot(), pool.slot():
                    assert await pool.in_use("alpha") == 2
                    await asyncio.to_thread(own_redis.restart, True)
                    assert own_redis.ping()
                return await pool.in_use("alpha")
        finally:
            await client.aclose()

    assert asyncio.run(main()) == 0
