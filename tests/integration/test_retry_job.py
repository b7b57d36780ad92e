"""`retry JOB`: a finished job's failed requests run again under the same id, after its cap
was raised, until its results are complete; each request is answered once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Env, api_keys
from jobs_support import (
    billed_tokens,
    expected_results,
    results_of,
    submit,
    text_requests,
    wait_ok,
    write_jsonl,
)
from sqlalchemy import text

from worker.db.session import get_engine
from worker.standin import ThreadedStandin


def test_retry_after_raising_the_cap_completes_the_results_exactly(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=2, beta=1))
    requests = text_requests(24)
    cap = sum(billed_tokens(r) for r in requests) // 4
    env.start_worker(concurrency=4)
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests), "--max-tokens", str(cap))
    wait_ok(env, job_id)
    failed = [line["custom_id"] for line in results_of(env, job_id) if line["status"] == "failed"]
    assert failed, "the cap stopped nothing: the test proves nothing"
    first_calls = standin.stats()["total"]["ok"]

    done = env.cli("retry", job_id, "--max-tokens", str(cap * 10))
    assert done.returncode == 0, done.stderr
    assert f"{len(failed)} requests queued again" in done.stdout
    wait_ok(env, job_id)

    lines = results_of(env, job_id)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    assert all(line["status"] == "succeeded" for line in lines)
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]
    # Only the failed ones were sent again, each once.
    assert standin.stats()["total"]["ok"] == first_calls + len(failed) == len(requests)
    status = json.loads(env.cli("status", job_id, "--json").stdout)
    assert (status["id"], status["status"], status["succeeded"]) == (job_id, "completed", 24)
    assert status["budget"]["max_tokens"] == cap * 10
    assert [job["id"] for job in json.loads(env.cli("jobs", "--json").stdout)] == [job_id]


def test_retry_runs_cancelled_requests_and_is_refused_while_a_job_runs(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url, api_keys(alpha=1))
    requests = text_requests(6)
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests))
    refused = env.cli("retry", job_id)
    assert refused.returncode == 1 and "still queued" in refused.stderr
    assert env.cli("cancel", job_id).returncode == 0  # no worker yet: nothing ran
    # A request that reached the poison limit before is a new request after a retry.
    with get_engine(sqlite_url).begin() as connection:
        connection.execute(text("UPDATE request SET deliveries = 5"))

    done = env.cli("retry", job_id)
    assert done.returncode == 0 and "6 requests queued again" in done.stdout
    env.start_worker(concurrency=2)
    wait_ok(env, job_id)
    assert {line["status"] for line in results_of(env, job_id)} == {"succeeded"}
    assert "nothing queued" in env.cli("retry", job_id).stdout
