"""Keys with rpm, tpm and quotas, held by two real worker processes against the stand-in,
which enforces the same limits as a provider would (and counts what it refused).

The rate window is shortened (RERANK_RATE_WINDOW_S, and the stand-in's window_s) so that a
job at the limit takes seconds rather than minutes; the rule is the same at any length.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from conftest import SECRETS, Env
from jobs_support import (
    assert_no_secret,
    expected_results,
    make_requests,
    results_of,
    submit,
    wait_ok,
    write_jsonl,
)
from sqlalchemy import select

from worker.db.models import UpstreamCall
from worker.db.session import get_sessionmaker
from worker.standin import ThreadedStandin
from worker.standin.scoring import rank

WINDOW_S = 3.0


def keys_json(**limits: dict[str, int]) -> str:
    return json.dumps([{"name": n, "secret": SECRETS[n], **extra} for n, extra in limits.items()])


def rate_env(make_env: Any, sqlite_url: str, keys: str) -> Env:
    env: Env = make_env(sqlite_url, keys, RERANK_RATE_WINDOW_S=str(WINDOW_S))
    return env


def call_times(url: str, job_id: str) -> list[float]:
    """When each upstream call of the job took its slot, in seconds, earliest first."""
    with get_sessionmaker(url)() as session:
        stamps = session.scalars(
            select(UpstreamCall.created_at)
            .where(UpstreamCall.job_id == job_id)
            .order_by(UpstreamCall.created_at)
        ).all()
    return [stamp.timestamp() for stamp in stamps]


def assert_all_correct(env: Env, job_id: str, requests: list[dict[str, Any]]) -> None:
    lines = results_of(env, job_id)
    assert len(lines) == len(requests)
    assert [
        (line["custom_id"], line.get("error")) for line in lines if line["status"] != "succeeded"
    ] == []
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]


def test_an_rpm_key_runs_its_rpm_at_once_then_the_rest_a_window_later_with_no_429(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env = rate_env(make_env, sqlite_url, keys_json(alpha={"concurrency": 8, "rpm": 30}))
    standin.update(rpm={"alpha": 30}, window_s=WINDOW_S, rate_limit_retry_after=False)
    requests = make_requests(60)
    env.start_worker(concurrency=2, processes=2)

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)

    assert_all_correct(env, job_id, requests)
    stats = standin.stats()["keys"]["alpha"]
    assert stats["refused_rpm"] == 0, stats
    assert stats["calls"] == 60
    times = call_times(sqlite_url, job_id)
    first, second = times[:30], times[30:]
    # The first 30 together, not one every two seconds; the next 30 a window later.
    assert first[-1] - first[0] < WINDOW_S / 2, first
    assert second[0] - first[0] >= WINDOW_S, (first[0], second[0])
    assert second[-1] - first[0] < 2 * WINDOW_S, (first[0], second[-1])


def test_a_tpm_key_billed_twice_the_estimate_sees_at_most_a_few_429s(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    requests = make_requests(80)
    # The stand-in bills twice its own count, which is not the worker's estimate either.
    billed = [2 * rank(r["query"], r["documents"], image_tokens=1000)[1] for r in requests]
    tpm = sum(billed) // 3  # about three windows' worth
    env = rate_env(make_env, sqlite_url, keys_json(alpha={"concurrency": 6, "tpm": tpm}))
    standin.update(tpm={"alpha": tpm}, window_s=WINDOW_S, token_factor=2)
    env.start_worker(concurrency=2, processes=2)

    started = time.monotonic()
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)
    elapsed_s = time.monotonic() - started

    assert_all_correct(env, job_id, requests)
    stats = standin.stats()["keys"]["alpha"]
    assert stats["refused_tpm"] <= 3, stats
    assert stats["tokens_billed"] == sum(billed)
    assert elapsed_s >= 2 * WINDOW_S  # the limit held: three windows' worth of tokens


def test_a_key_at_its_daily_quota_drops_out_and_the_other_key_carries_on(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    quota = 2000
    keys = keys_json(alpha={"concurrency": 2, "daily_tokens": quota}, beta={"concurrency": 2})
    env = rate_env(make_env, sqlite_url, keys)
    requests = make_requests(40)
    env.start_worker(concurrency=2, processes=2)

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)

    assert_all_correct(env, job_id, requests)
    stats = standin.stats()["keys"]
    # Alpha was billed its quota, plus at most what its two slots had in flight then.
    biggest_call = max(rank(r["query"], r["documents"])[1] for r in requests)
    assert quota <= stats["alpha"]["tokens_billed"] <= quota + 2 * biggest_call
    assert stats["beta"]["ok"] > stats["alpha"]["ok"]


def test_with_every_key_at_its_quota_requests_fail_no_usable_key_naming_the_quota(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    keys = keys_json(
        alpha={"concurrency": 1, "daily_tokens": 300},
        beta={"concurrency": 1, "monthly_tokens": 300},
    )
    env = rate_env(make_env, sqlite_url, keys)
    requests = make_requests(30)
    env.start_worker(concurrency=2, processes=2)

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)

    lines = results_of(env, job_id)
    failed = [line for line in lines if line["status"] == "failed"]
    assert failed and len(failed) < len(lines)
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    for line in failed:
        assert line["error"]["type"] == "no_usable_key"
        message = line["error"]["message"]
        assert f"key 'alpha' reached its daily quota of 300 tokens until {tomorrow}T00:00Z" in (
            message
        )
        assert "key 'beta' reached its monthly quota of 300 tokens until " in message
    assert_no_secret(json.dumps(lines), env.all_logs())
