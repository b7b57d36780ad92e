"""`rerank-worker worker --processes N`: N Celery workers under one command, sharing the slots.

Each process takes at most its share of the slots at once, so more calls in flight than one
share proves that more than one process was calling; the keys' limits still hold.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from conftest import Env, api_keys, wait_for
from jobs_support import expected_results, make_requests, results_of, submit, wait_ok, write_jsonl

from worker.standin import ThreadedStandin

LIMITS = {"alpha": 2, "beta": 2}
SHARE = 2  # slots per process: 4 slots over 2 processes


def children_of(pid: int) -> list[int]:
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(child) for child in children.read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def start_two(env: Env) -> tuple[subprocess.Popen[bytes], list[int]]:
    parent = env.start_worker(concurrency=2, name="pair", processes=2)
    children = children_of(parent.pid)
    assert len(children) == 2, children
    return parent, children


def test_two_processes_share_the_slots_and_run_a_job_within_limits(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(**LIMITS))
    standin.update(latency_ms=60)
    requests = make_requests(80)
    parent, children = start_two(env)

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)

    lines = results_of(env, job_id)
    assert all(line["status"] == "succeeded" for line in lines)
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]
    stats = standin.stats()
    for name, limit in LIMITS.items():
        assert stats["keys"][name]["max_in_flight"] <= limit, stats["keys"][name]
    assert stats["total"]["max_in_flight"] > SHARE, "only one process was calling"
    assert stats["total"]["calls"] == len(requests)

    # A SIGTERM to the parent alone is a warm shutdown of both processes.
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 0
    assert not any(alive(child) for child in children)


def test_when_one_process_dies_the_worker_stops_the_other_and_exits_with_its_status(
    make_env: Any, database_url: str
) -> None:
    env: Env = make_env(database_url, api_keys(**LIMITS))
    parent, children = start_two(env)

    os.kill(children[0], signal.SIGKILL)

    assert parent.wait(timeout=30) == 128 + signal.SIGKILL
    wait_for(lambda: not alive(children[1]), 30, "the other process to stop")
    assert "action=worker_process_ended" in env.all_logs()
