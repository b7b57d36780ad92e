"""RERANK_LOG_FORMAT=json: a real worker's log is one JSON object per line, with the fields
of the `action=... key=...` lines, and no secret in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import SECRETS, Env, wait_for
from jobs_support import make_requests, submit, wait_ok, write_jsonl

from worker.standin import ThreadedStandin


def test_a_workers_json_log_has_one_object_a_line_with_the_action_fields_and_no_secret(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url, RERANK_LOG_FORMAT="json")
    standin.update(fault_429=0.3, retry_after_s=0.05, fault_drop=0.1, seed=3)
    stderr_path, stdout_path = tmp_path / "worker.err", tmp_path / "worker.out"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    environ.update(env.values)
    with stderr_path.open("wb") as stderr, stdout_path.open("wb") as stdout:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "-c", "2", "-l", "INFO",
             "--processes", "2", "--metrics-port", "0"],
            env=environ, stdout=stdout, stderr=stderr, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    env.workers.append(worker)
    wait_for(lambda: stderr_path.read_text().count(" ready.") >= 2, 60, "the worker to be ready")

    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", make_requests(30)))
    wait_ok(env, job_id)
    env.stop_workers()

    text = stderr_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line is an object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    retries = [r for r in records if r.get("action") == "rerank_retry"]
    assert retries, text[-3000:]
    for retry in retries:
        assert retry["key"] in SECRETS
        assert isinstance(retry["attempt"], int) and isinstance(retry["delay_s"], float)
        assert retry["level"] == "INFO" and retry["logger"] == "worker.engine"
        assert f"key={retry['key']}" in retry["message"]
    # The supervisor's own lines (it serves the metrics) are JSON too.
    assert any(r.get("action") == "metrics_serving" for r in records)
    assert any(r["message"].endswith(" ready.") for r in records)
    for secret in SECRETS.values():
        assert secret not in text
        assert secret not in stdout_path.read_text()
