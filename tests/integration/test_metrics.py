"""`rerank-worker worker --metrics-port`: one Prometheus view over all the worker's processes.

The counters are checked against the stand-in's own count of what it was sent and what it
billed, after a job with faults on two worker processes: a process that undercounted, or a
scrape that showed one process only, would not add up.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from conftest import Env, api_keys, wait_for
from jobs_support import make_requests, submit, wait_ok, write_jsonl
from prometheus_client.parser import text_string_to_metric_families

from worker.standin import ThreadedStandin

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


def metrics_port(log: Path) -> int:
    found = re.search(r"action=metrics_serving host=\S+ port=(\d+)", log.read_text())
    assert found, log.read_text()[-3000:]
    return int(found.group(1))


def test_metrics_of_two_processes_agree_with_the_upstreams_counts_after_faults(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=2, beta=2))
    standin.update(latency_ms=20, fault_429=0.06, fault_5xx=0.08, fault_drop=0.05, seed=11)
    env.start_worker(concurrency=2, name="metered", processes=2, extra_args=["--metrics-port", "0"])
    port = metrics_port(env.logs[-1])
    before = scrape(port)
    assert total(before, "rerank_upstream_calls_total") == 0
    assert total(before, "rerank_key_slots_limit", key="alpha") == 2

    requests = make_requests(90)
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)

    stats = standin.stats()
    after = scrape(port)
    by_status = stats["total"]["status_counts"]
    assert set(by_status) >= {"200", "429"} and stats["total"]["drops"], stats["total"]
    assert total(after, "rerank_upstream_calls_total") == stats["total"]["calls"]
    for status, count in by_status.items():
        assert total(after, "rerank_upstream_calls_total", status=status) == count, status
    assert (
        total(after, "rerank_upstream_calls_total", status="connection")
        == (stats["total"]["drops"])
    )
    for name, counters in stats["keys"].items():
        assert total(after, "rerank_upstream_calls_total", key=name) == counters["calls"], name
        assert total(after, "rerank_tokens_total", key=name) == counters["tokens_billed"], name
    assert total(after, "rerank_upstream_call_duration_seconds_count") == (stats["total"]["calls"])
    assert total(after, "rerank_requests_finished_total", status="succeeded") == len(requests)
    assert total(after, "rerank_key_pauses_total") == by_status["429"]
    # Job ids never become labels: every label value is from a small fixed set.
    label_values = {v for series in after.values() for labels, _ in series for v in labels.values()}
    assert job_id not in label_values
    # The Redis state, read at the scrape: nothing in flight now, nothing queued.
    assert total(after, "rerank_redis_up") == 1
    assert total(after, "rerank_key_slots_in_use") == 0
    assert total(after, "rerank_queue_depth", queue="bulk") == 0


def test_the_metrics_show_slots_in_use_and_a_paused_key_while_it_happens(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path, redis_client: Any
) -> None:
    env: Env = make_env(sqlite_url, api_keys(alpha=2))
    standin.update(latency_ms=400)
    env.start_worker(concurrency=2, name="busy", extra_args=["--metrics-port", "0"])
    port = metrics_port(env.logs[-1])
    redis_client.set("rerank:pause:alpha", "1", px=60_000)
    paused = scrape(port)
    assert 50 < total(paused, "rerank_key_paused_seconds", key="alpha") <= 60
    redis_client.delete("rerank:pause:alpha")

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", make_requests(20)))
    wait_for(
        lambda: total(scrape(port), "rerank_key_slots_in_use", key="alpha") == 2,
        30,
        "both of alpha's slots in use",
    )
    wait_ok(env, job_id)
    assert total(scrape(port), "rerank_key_slots_in_use", key="alpha") == 0
