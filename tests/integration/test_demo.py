"""`rerank-worker demo` on the embedded defaults: rankings that read right, and where to look."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis


def test_the_demo_ranks_by_the_querys_words_and_says_where_the_dashboard_is(
    tmp_path: Path,
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    environ.update(RERANK_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "demo", "--latency-ms", "5"],
            env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    finally:
        socket = tmp_path / "data" / "redis.sock"
        if socket.exists():
            redis.Redis(unix_socket_path=str(socket)).shutdown(nosave=True)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    # Rank 1 of each request (the line that names it) is the document sharing the query's words.
    first = {
        line.split()[1]: line for line in text.splitlines() if re.match(r"│ [a-z-]+\s+│ 1 ", line)
    }
    assert "Accuracy rose" in first["images"], text
    assert "Per-process rate limits" in first["rate-limits"], text
    assert "ReaderLM" in first["small-models"], text
    assert "Late acknowledgement" in first["queues"], text
    assert "dashboard: rerank-worker api, then http://127.0.0.1:8080/" in text
