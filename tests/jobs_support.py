"""Helpers shared by the tests that drive whole jobs through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from conftest import SECRETS, Env
from sqlalchemy import text

from worker.db.session import get_engine
from worker.standin.scoring import rank


def make_requests(
    count: int, *, big_at: int | None = None, big_size: int = 450
) -> list[dict[str, Any]]:
    rng = random.Random(count)
    requests = []
    for i in range(count):
        size = big_size if i == big_at else rng.randint(1, 12)
        documents: list[Any] = []
        for j in range(size):
            kind = rng.random()
            if kind < 0.1:
                documents.append({"image": f"https://example.test/img/{i}-{j}.png"})
            elif kind < 0.5:
                documents.append(
                    {"text": f"document {j} of request {i} about topic {rng.randint(0, 50)}"}
                )
            else:
                documents.append(f"plain text {j} for request {i}, word {rng.random():.5f}")
        request: dict[str, Any] = {
            "custom_id": f"r-{i}",
            "query": f"query number {i}",
            "documents": documents,
        }
        if i % 3 == 0:
            request["top_n"] = 5 if i != big_at else 20
        requests.append(request)
    return requests


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    results, _ = rank(request["query"], request["documents"], request.get("top_n"), False)
    return results


def submit(env: Env, path: Path, *args: str) -> str:
    done = env.cli("submit", str(path), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def wait_ok(env: Env, job_id: str, timeout_s: float = 150) -> None:
    done = env.cli("wait", job_id, "--timeout", str(timeout_s), timeout_s=timeout_s + 30)
    assert done.returncode == 0, done.stderr + env.all_logs()[-5000:]


def results_of(env: Env, job_id: str) -> list[dict[str, Any]]:
    done = env.cli("results", job_id)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def database_text(url: str) -> str:
    """Every value of every table, as text: where a leaked secret would show."""
    dump = []
    with get_engine(url).connect() as connection:
        for table in ("job", "request", "document", "upstream_call", "model_price"):
            for row in connection.execute(text(f"SELECT * FROM {table}")):
                dump.append(repr(tuple(row)))
    return "\n".join(dump)


def assert_no_secret(*texts: str) -> None:
    for secret in SECRETS.values():
        for blob in texts:
            assert secret not in blob


def text_requests(count: int, documents: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"r-{i}",
            "query": f"what is item {i} about",
            "documents": [
                f"document {j} of request {i}, some words here" for j in range(documents)
            ],
        }
        for i in range(count)
    ]


def billed_tokens(request: dict[str, Any]) -> int:
    return rank(request["query"], request["documents"])[1]
