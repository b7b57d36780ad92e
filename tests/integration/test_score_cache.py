"""The score cache on real parts: a re-run pays only for what changed, and says what it saved."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from conftest import Env, wait_for
from jobs_support import submit, write_jsonl

from worker.service import read, usage
from worker.standin import ThreadedStandin
from worker.standin.scoring import rank

QUERY = "which documents talk about rivers"
CORPUS_SIZE = 250
PER_CALL = 100


def corpus(changed: frozenset[int] = frozenset()) -> list[Any]:
    """Documents in every accepted shape; `changed` positions get a new text."""
    documents: list[Any] = []
    for i in range(CORPUS_SIZE):
        words = f"document {i} about {'rivers' if i % 7 == 0 else 'mountains'}"
        if i in changed:
            words += " (revised)"
        if i % 3 == 0:
            documents.append({"id": f"d{i}", "text": words})
        elif i % 3 == 1:
            documents.append({"text": words})
        else:
            documents.append(words)
    return documents


def expected_ranking(documents: list[Any], top_n: int) -> list[dict[str, Any]]:
    sent = [{"text": d["text"]} if isinstance(d, dict) else d for d in documents]
    results, _ = rank(QUERY, sent, top_n, False)
    for entry in results:
        document = documents[entry["index"]]
        if isinstance(document, dict) and "id" in document:
            entry["id"] = document["id"]
    return results


def finished(job_id: str) -> dict[str, Any]:
    """Poll the job in this process (the CLI's own start-up would dominate these tests)."""
    status = wait_for(
        lambda: (s := read.job_status(job_id))["status"] in ("completed", "failed") and s,
        120,
        f"job {job_id} to end",
    )
    assert isinstance(status, dict) and status["status"] == "completed", status
    return status


def run_corpus(env: Env, path: Path, *args: str) -> dict[str, Any]:
    job_id = submit(env, path, "--query", QUERY, "--top-n", "10", *args)
    finished(job_id)
    out = io.StringIO()
    read.write_results(job_id, out)
    (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
    return {"results": line["results"], "usage": usage.usage_report(job_id)}


def scored(standin: ThreadedStandin) -> tuple[int, int]:
    """(answered calls, documents in them) since the last reset; then reset."""
    total = standin.stats()["total"]
    standin.reset()
    return total["ok"], total["documents_scored"]


def test_a_rerun_sends_only_changed_documents_and_reports_the_savings(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, RERANK_MAX_DOCUMENTS_PER_CALL=str(PER_CALL))
    env.start_worker(concurrency=4)
    path = write_jsonl(tmp_path / "corpus.jsonl", corpus())

    first = run_corpus(env, path)
    assert first["results"] == expected_ranking(corpus(), 10)
    assert scored(standin) == (3, CORPUS_SIZE)
    assert first["usage"]["cache"]["hits"] == 0
    paid = first["usage"]["total_tokens"]
    assert paid > 0

    again = run_corpus(env, path)
    assert scored(standin) == (0, 0), "an unchanged corpus must make no upstream call"
    assert again["results"] == first["results"]
    cache = again["usage"]["cache"]
    assert (cache["hits"], cache["hit_rate"]) == (CORPUS_SIZE, 1.0)
    assert abs(cache["tokens_saved"] - paid) <= 1
    assert cache["cost_saved"] > 0
    assert again["usage"]["total_tokens"] == 0

    # Seven documents changed, spread over what were three calls: one call of seven.
    changed = frozenset({0, 40, 99, 100, 150, 201, 249})
    edited = write_jsonl(tmp_path / "edited.jsonl", corpus(changed))
    third = run_corpus(env, edited)
    assert scored(standin) == (1, len(changed))
    assert third["results"] == expected_ranking(corpus(changed), 10)
    assert third["usage"]["cache"]["hits"] == CORPUS_SIZE - len(changed)

    uncached = run_corpus(env, path, "--no-cache")
    assert scored(standin) == (3, CORPUS_SIZE)
    assert uncached["results"] == first["results"]
    assert uncached["usage"]["cache"]["hits"] == 0


def test_listwise_models_are_never_cached(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    """jina-reranker-v3 ranks a call's documents together: a score alone means nothing."""
    env: Env = make_env(database_url)
    env.start_worker(concurrency=2)
    request = {"custom_id": "q", "query": QUERY, "documents": ["a river", "a hill", "a lake"]}
    path = write_jsonl(tmp_path / "requests.jsonl", [request])
    for _ in range(2):
        job_id = submit(env, path, "--model", "jina-reranker-v3")
        status = finished(job_id)
        assert scored(standin) == (1, 3)
    assert status["cache"]["hits"] == 0
