"""Engine.start: requests handed over in one go run on the engine's loop, against the stand-in
and real Redis, and every one of them ends with an outcome, a crashing one included."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator

import pytest
from conftest import api_keys
from pydantic import SecretStr

from worker.domain import RequestOutcome, RequestWork
from worker.runtime import Engine
from worker.settings import Settings
from worker.standin import ThreadedStandin

_ids = itertools.count(1)


def work(query: str) -> RequestWork:
    return RequestWork(
        request_id=next(_ids),
        job_id="j",
        query=query,
        model="jina-reranker-m0",
        top_n=None,
        return_documents=False,
        documents_json=['"first"', '"second"', '"third"'],
        delivery=1,
    )


@pytest.fixture
def engine(redis_url: str, standin: ThreadedStandin, sqlite_url: str) -> Iterator[Engine]:
    """An engine with a database of its own for the epoch witness: with the default data
    directory, an epoch kept by one test would make the next (whose Redis is emptied) see
    lost state and wait out a quarantine."""
    settings = Settings(
        api_keys=SecretStr(api_keys(alpha=2, beta=2)),
        api_base=standin.base_url,
        redis_url=redis_url,
        database_url=sqlite_url,
    )
    made = Engine(settings)
    yield made
    made.close()


def outcomes_of(engine: Engine, batch: list[RequestWork]) -> dict[int, RequestOutcome]:
    ended: queue.Queue[tuple[RequestWork, RequestOutcome]] = queue.Queue()
    engine.start(batch, lambda w, outcome: ended.put((w, outcome)))
    received = [ended.get(timeout=20) for _ in batch]
    assert all(w.request_id == outcome.request_id for w, outcome in received)
    return {outcome.request_id: outcome for _, outcome in received}


def test_a_batch_runs_under_the_key_limits_and_each_request_ends(
    engine: Engine, standin: ThreadedStandin
) -> None:
    batch = [work(f"query {i}") for i in range(12)]
    outcomes = outcomes_of(engine, batch)
    assert sorted(outcomes) == sorted(w.request_id for w in batch)
    assert {o.status for o in outcomes.values()} == {"succeeded"}
    stats = standin.stats()
    assert stats["total"]["ok"] == 12
    assert all(stats["keys"][name]["max_in_flight"] <= 2 for name in ("alpha", "beta"))


def test_a_request_that_crashes_ends_failed_and_the_others_still_succeed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashing, fine = work("crash"), work("fine")
    run = engine.reranker.run

    async def run_or_crash(item: RequestWork) -> RequestOutcome:
        if item is crashing:
            raise RuntimeError("a bug")
        return await run(item)

    monkeypatch.setattr(engine.reranker, "run", run_or_crash)
    outcomes = outcomes_of(engine, [crashing, fine])
    failed = outcomes[crashing.request_id]
    assert (failed.status, failed.error_type) == ("failed", "internal_error")
    assert failed.error_message == "RuntimeError: a bug"
    assert outcomes[fine.request_id].status == "succeeded"
