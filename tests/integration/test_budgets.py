"""Job budgets on real parts: a capped job's calls are reserved and settled in Redis by
worker processes, so concurrent calls cannot overshoot the cap together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Env, api_keys
from jobs_support import billed_tokens, results_of, submit, text_requests, wait_ok, write_jsonl

from worker.standin import ThreadedStandin


def test_a_capped_job_bills_no_more_than_its_cap_plus_the_calls_in_flight(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    """Two worker processes, 5 slots, one call per request: once the cap is reached the
    rest end budget_exceeded, and the job completed."""
    env: Env = make_env(database_url, api_keys(alpha=3, beta=2))
    standin.update(latency_ms=40)
    requests = text_requests(60)
    per_call = max(billed_tokens(r) for r in requests)
    cap = sum(billed_tokens(r) for r in requests) // 3
    path = write_jsonl(tmp_path / "r.jsonl", requests)
    env.start_worker(concurrency=4, name="one")
    env.start_worker(concurrency=4, name="two")

    job_id = submit(env, path, "--max-tokens", str(cap))
    wait_ok(env, job_id)

    billed = standin.stats()["total"]["tokens_billed"]
    in_flight = 3 + 2  # the keys' slots: no more calls than that can be out at once
    assert billed <= cap + in_flight * per_call
    assert billed >= cap // 2, "the cap was hardly used: the test proves nothing"
    lines = results_of(env, job_id)
    refused = [line for line in lines if line["status"] == "failed"]
    assert refused and len(refused) < len(lines)
    assert {line["error"]["type"] for line in refused} == {"budget_exceeded"}
    assert f"--max-tokens {cap}" in refused[0]["error"]["message"]
    status = json.loads(env.cli("status", job_id, "--json").stdout)
    assert status["status"] == "completed"
    assert status["budget"] == {
        "max_tokens": cap,
        "max_cost": None,
        "spent_tokens": billed,
        "spent_cost": status["usage"]["cost"],
    }
    text = env.cli("status", job_id).stdout
    assert f"budget: tokens {billed} of {cap}" in text


def test_a_cost_cap_uses_the_price_table(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url, api_keys(alpha=2))
    standin.update(latency_ms=20)
    assert env.cli("prices", "set", "jina-reranker-m0", "1000").returncode == 0
    requests = text_requests(30)
    per_call_cost = max(billed_tokens(r) for r in requests) / 1000
    cap = round(sum(billed_tokens(r) for r in requests) / 1000 / 2, 6)
    env.start_worker(concurrency=4)

    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests), "--max-cost", str(cap))
    wait_ok(env, job_id)

    cost = standin.stats()["total"]["tokens_billed"] / 1000
    assert cap / 2 <= cost <= cap + 2 * per_call_cost
    lines = results_of(env, job_id)
    refused = [line for line in lines if line["status"] == "failed"]
    assert refused and {line["error"]["type"] for line in refused} == {"budget_exceeded"}
    assert "--max-cost" in refused[0]["error"]["message"]
    status = json.loads(env.cli("status", job_id, "--json").stdout)
    assert status["budget"]["max_cost"] == cap
    assert abs(status["budget"]["spent_cost"] - cost) < 1e-6


def test_a_cost_cap_without_a_price_runs_nothing(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url, api_keys(alpha=2))
    env.start_worker(concurrency=2)
    path = write_jsonl(tmp_path / "r.jsonl", text_requests(3))
    unpriced = "jina-reranker-v2-base-multilingual"
    job_id = submit(env, path, "--max-cost", "1", "--model", unpriced)
    wait_ok(env, job_id)
    lines = results_of(env, job_id)
    assert {line["error"]["type"] for line in lines} == {"budget_exceeded"}
    assert "has no price" in lines[0]["error"]["message"]
    assert standin.stats()["total"]["calls"] == 0


def test_a_bad_cap_exits_2_naming_the_option(
    make_env: Any, sqlite_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url)
    path = write_jsonl(tmp_path / "r.jsonl", text_requests(1))
    done = env.cli("submit", str(path), "--max-tokens", "0")
    assert done.returncode == 2 and "max_tokens" in done.stderr
    assert json.loads(env.cli("jobs", "--json").stdout) == []
