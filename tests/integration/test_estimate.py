"""`estimate`: a file's calls, tokens, cost, cached pairs and time, with nothing stored; its
figures match what a real run then does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Env, api_keys
from jobs_support import make_requests, submit, wait_ok, write_jsonl
from sqlalchemy import func, select

from worker import constants
from worker.db.models import Base
from worker.db.session import get_engine
from worker.standin import ThreadedStandin


def row_counts(url: str) -> dict[str, int]:
    with get_engine(url).connect() as connection:
        return {
            table.name: connection.scalar(select(func.count()).select_from(table)) or 0
            for table in Base.metadata.sorted_tables
        }


def estimate(env: Env, *args: str) -> dict[str, Any]:
    done = env.cli("estimate", *args, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_estimate_stores_nothing_and_matches_the_run(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=3, beta=2), RERANK_MAX_DOCUMENTS_PER_CALL="5")
    requests = make_requests(20)
    path = write_jsonl(tmp_path / "r.jsonl", requests)
    before = row_counts(database_url)

    first = estimate(env, str(path))

    assert row_counts(database_url) == before
    assert set(first) >= {
        "requests", "calls", "estimated_tokens", "estimated_cost", "cached_pairs",
        "estimated_seconds",
    }  # fmt: skip
    documents = sum(len(r["documents"]) for r in requests)
    assert (first["requests"], first["cached_pairs"]) == (20, 0)
    assert first["calls"] == sum(-(-len(r["documents"]) // 5) for r in requests)
    assert first["latency_from"] == "setting" and first["estimated_seconds"] > 0

    env.start_worker(concurrency=4)
    job_id = submit(env, path)
    wait_ok(env, job_id)
    stats = standin.stats()["total"]
    assert stats["calls"] == first["calls"]
    billed = stats["tokens_billed"]
    assert 0.5 * billed <= first["estimated_tokens"] <= 2 * billed
    status = json.loads(env.cli("status", job_id, "--json").stdout)
    assert status["total"] == first["requests"]
    # The price table's jina-reranker-m0 price, over the estimated tokens.
    assert abs(first["estimated_cost"] - first["estimated_tokens"] * 0.02 / 1e6) < 1e-9

    after = row_counts(database_url)
    again = estimate(env, str(path))
    assert row_counts(database_url) == after
    assert again["cached_pairs"] == documents
    assert (again["calls"], again["estimated_tokens"], again["estimated_cost"]) == (0, 0, 0.0)
    assert again["latency_from"] == "measured"


def test_a_corpus_is_estimated_as_one_request(
    make_env: Any, sqlite_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url, RERANK_MAX_DOCUMENTS_PER_CALL="100")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(f"document number {i}") + "\n" for i in range(250)))
    result = estimate(env, str(corpus), "--query", "which one", "--model", "rerank-2.5")
    assert (result["requests"], result["calls"], result["search_units"]) == (1, 3, 3)
    assert result["unpriced_models"] == ["rerank-2.5"]
    text = env.cli("estimate", str(corpus), "--query", "which one").stdout
    assert "upstream calls: 3" in text and "estimated time" in text


def test_a_bad_line_exits_2_naming_line_and_field_and_stores_nothing(
    make_env: Any, database_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(database_url)
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"query": "q", "documents": ["a"]}) + "\n" + json.dumps({"query": "q"}) + "\n"
    )
    before = row_counts(database_url)
    done = env.cli("estimate", str(path))
    assert done.returncode == 2
    assert "line 2" in done.stderr and "documents" in done.stderr
    assert row_counts(database_url) == before


def test_estimate_applies_the_billed_to_estimated_ratio_the_workers_learnt(
    make_env: Any, sqlite_url: str, redis_client: Any, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url)
    path = write_jsonl(tmp_path / "r.jsonl", make_requests(10))
    plain = estimate(env, str(path))["estimated_tokens"]

    redis_client.hset(constants.TOKEN_RATIO_KEY, constants.DEFAULT_MODEL, "2.5")
    learnt = estimate(env, str(path))["estimated_tokens"]

    assert plain > 0
    assert learnt == round(plain * 2.5)
