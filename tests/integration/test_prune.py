"""`prune`: old finished jobs go in small transactions with their requests, documents and
calls; `usage` reports the same totals before and after; old score-cache entries go too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, api_keys
from jobs_support import make_requests, submit, wait_ok, write_jsonl
from sqlalchemy import text

from worker.db.session import get_engine
from worker.service import prune as prune_module

BACKDATE = {
    "postgresql": "now() - interval '10 days'",
    "sqlite": "datetime('now', '-10 days')",
}


def backdate(url: str, table: str, column: str, where: str, **params: Any) -> None:
    engine = get_engine(url)
    with engine.begin() as connection:
        when = BACKDATE[engine.dialect.name]
        connection.execute(text(f"UPDATE {table} SET {column} = {when} WHERE {where}"), params)


def count(url: str, query: str, **params: Any) -> int:
    with get_engine(url).connect() as connection:
        return int(connection.scalar(text(query), params) or 0)


def test_prune_removes_old_jobs_and_keeps_usage_totals(
    make_env: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=3, beta=2))
    env.start_worker(concurrency=4)
    old = submit(env, write_jsonl(tmp_path / "old.jsonl", make_requests(25)), "--no-cache")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(f"corpus document {i}") + "\n" for i in range(45)))
    old_corpus = submit(env, corpus, "--query", "which", "--no-cache")
    recent = submit(env, write_jsonl(tmp_path / "new.jsonl", make_requests(5)))
    for job_id in (old, old_corpus, recent):
        wait_ok(env, job_id)
    for job_id in (old, old_corpus):
        backdate(database_url, "job", "finished_at", "id = :id", id=job_id)
    before = json.loads(env.cli("usage", "--json").stdout)
    assert before["calls"] > 25
    cache_entries = count(database_url, "SELECT count(*) FROM score_cache")
    assert cache_entries > 0
    backdate(database_url, "score_cache", "created_at", "1 = 1")
    # Small transactions, so batching and the corpus's slices are exercised.
    monkeypatch.setattr(prune_module, "REQUESTS_PER_TRANSACTION", 7)
    monkeypatch.setattr(prune_module, "DOCUMENTS_PER_TRANSACTION", 20)

    result = prune_module.prune(5, cache_older_than_days=5)

    assert (result.jobs, result.requests, result.cache_entries) == (2, 26, cache_entries)
    assert result.documents == sum(len(r["documents"]) for r in make_requests(25)) + 45
    for job_id in (old, old_corpus):
        assert count(database_url, "SELECT count(*) FROM request WHERE job_id = :j", j=job_id) == 0
        assert (
            count(database_url, "SELECT count(*) FROM upstream_call WHERE job_id = :j", j=job_id)
            == 0
        )
        assert env.cli("status", job_id).returncode == 1
    assert count(database_url, "SELECT count(*) FROM job") == 1
    assert count(database_url, "SELECT count(*) FROM score_cache") == 0
    assert (
        count(
            database_url,
            "SELECT count(*) FROM document WHERE request_id NOT IN (SELECT id FROM request)",
        )
        == 0
    )
    after = json.loads(env.cli("usage", "--json").stdout)
    for figure in ("calls", "billed_calls", "total_tokens", "cost", "search_units"):
        assert after[figure] == pytest.approx(before[figure]), figure
    assert after["by_key_and_model"] == before["by_key_and_model"]
    recent_status = json.loads(env.cli("status", recent, "--json").stdout)
    assert recent_status["succeeded"] == 5

    done = env.cli("prune", "--older-than", "5", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["jobs"] == 0
    assert env.cli("prune", "--older-than", "-1").returncode == 2
