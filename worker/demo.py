"""`rerank-worker demo`: the stand-in API, a worker, an example job and its ranked results."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker import constants, errors
from worker.schema import ensure_schema
from worker.service import read, submit, usage
from worker.settings import get_settings
from worker.standin import StandinConfig, run_in_thread

DEMO_KEY_NAME = "demo"
DEMO_SECRET = "sk-standin-demo"
DEMO_SLOTS = 4
SNIPPET_CHARS = 70


def example_path() -> Path:
    return Path(str(resources.files("worker") / "examples" / "demo.jsonl"))


def _snippet(document_json: str) -> str:
    document = json.loads(document_json)
    if isinstance(document, dict):
        kind, value = next(iter(document.items()))
        text = f"[{kind}] {value}" if kind == "image" else value
    else:
        text = document
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _ranked_table(job_id: str, example: Path) -> Table:
    requests = [json.loads(line) for line in example.read_text().splitlines() if line.strip()]
    documents = {
        r["custom_id"]: [json.dumps(d, ensure_ascii=False) for d in r["documents"]]
        for r in requests
    }
    queries = {r["custom_id"]: r["query"] for r in requests}
    table = Table("request", "rank", "score", "document", title=f"job {job_id}")
    buffer = io.StringIO()
    read.write_results(job_id, buffer)
    for line in buffer.getvalue().splitlines():
        row = json.loads(line)
        custom_id = row["custom_id"]
        table.add_section()
        if row["status"] != "succeeded":
            table.add_row(custom_id, "-", "-", f"failed: {row['error']['message']}")
            continue
        for rank, result in enumerate(row["results"], start=1):
            label = f"{custom_id}\n[dim]{queries[custom_id]}[/]" if rank == 1 else ""
            table.add_row(
                label,
                str(rank),
                f"{result['relevance_score']:.4f}",
                escape(_snippet(documents[custom_id][result["index"]])),
            )
    return table


def run(out: Console, err: Console, *, latency_ms: float) -> None:
    from worker.cli import _wait

    standin = run_in_thread(StandinConfig(keys={DEMO_KEY_NAME: DEMO_SECRET}, latency_ms=latency_ms))
    worker: subprocess.Popen[bytes] | None = None
    try:
        os.environ["RERANK_API_BASE"] = standin.base_url
        os.environ["RERANK_API_KEYS"] = f"{DEMO_KEY_NAME}={DEMO_SECRET}@{DEMO_SLOTS}"
        get_settings.cache_clear()
        settings = get_settings()
        ensure_schema(settings.sqlalchemy_url())
        err.print(f"stand-in API at {standin.base_url} (key '{DEMO_KEY_NAME}', {DEMO_SLOTS} slots)")
        log_path = settings.resolved_data_dir() / "demo-worker.log"
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", "--concurrency", "2", "-l", "WARNING"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        example = example_path()
        with example.open("rb") as stream:
            result = submit.submit_job(stream, source=str(example), settings=settings)
        err.print(f"job {result.job_id}: {result.total_requests} requests from {example.name}")
        if not _wait(result.job_id, 120, settings):
            raise errors.RerankError(f"the demo job did not complete; see {log_path}")
        out.print(_ranked_table(result.job_id, example))
        report = usage.usage_report(result.job_id, settings)
        out.print(
            f"usage: {report['total_tokens']} tokens in {report['calls']} calls, "
            f"cost {report['cost']:.8f} PTC (stand-in prices as jina-reranker-m0)"
        )
        out.print(f"try: rerank-worker results {result.job_id}")
        out.print(
            f"dashboard: rerank-worker api, then http://{constants.API_HOST}:{constants.API_PORT}/"
            " (sign in with a token from `rerank-worker tokens create NAME`)"
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        standin.close()
