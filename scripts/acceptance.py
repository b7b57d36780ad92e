"""Issue 2's acceptance run, printed as figures.

Two workers (--concurrency 6 each), two keys (3 and 2 slots), the stand-in answering
8% 503, 4% 429 and 2% dropped connections; a 61-request job in which one request has
450 documents sent 100 per call. Uses RERANK_DATABASE_URL / RERANK_REDIS_URL when set,
else the embedded defaults in a temporary data dir.

    python scripts/acceptance.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker import embedded
from worker.standin import StandinConfig, run_in_thread
from worker.standin.scoring import rank

SECRETS = {"alpha": "sk-acceptance-alpha-0123456789", "beta": "sk-acceptance-beta-9876543210"}


def make_requests(count: int, big_at: int) -> list[dict[str, Any]]:
    rng = random.Random(61)
    requests = []
    for i in range(count):
        size = 450 if i == big_at else rng.randint(2, 12)
        documents: list[Any] = [
            {"image": f"https://example.test/{i}/{j}.png"}
            if rng.random() < 0.1
            else f"document {j} of request {i}: {rng.random():.6f}"
            for j in range(size)
        ]
        request: dict[str, Any] = {
            "custom_id": f"r-{i}",
            "query": f"query {i}",
            "documents": documents,
        }
        if i % 3 == 0:
            request["top_n"] = 20 if i == big_at else 5
        requests.append(request)
    return requests


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="rerank-acceptance-"))
    requests = make_requests(61, big_at=18)
    path = work / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    config = StandinConfig(
        keys=SECRETS, latency_ms=50, fault_5xx=0.08, fault_429=0.04, fault_drop=0.02,
        retry_after_s=0.5, pause_grace_ms=100, seed=2,
    )  # fmt: skip
    with run_in_thread(config) as standin:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RERANK_") or k in ("RERANK_DATABASE_URL", "RERANK_REDIS_URL")
        }
        env.update(
            RERANK_API_BASE=standin.base_url,
            RERANK_API_KEYS=f"alpha={SECRETS['alpha']}@3,beta={SECRETS['beta']}@2",
            RERANK_MAX_DOCUMENTS_PER_CALL="100",
            RERANK_DATA_DIR=str(work / "data"),
        )
        if "RERANK_DATABASE_URL" in env:
            assert cli(env, "db", "upgrade").returncode == 0
        workers = []
        for name in ("one", "two"):
            log = (work / f"worker-{name}.log").open("wb")
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        "worker",
                        "--concurrency",
                        "6",
                        "-n",
                        f"{name}@%h",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        try:
            started = time.monotonic()
            submitted = cli(env, "submit", str(path))
            job_id = submitted.stdout.strip().splitlines()[-1]
            waited = cli(env, "wait", job_id, "--timeout", "300")
            elapsed_s = time.monotonic() - started
            lines = [json.loads(x) for x in cli(env, "results", job_id).stdout.splitlines()]
            usage = json.loads(cli(env, "usage", "--job", job_id, "--json").stdout)
            outputs = (
                submitted.stdout
                + submitted.stderr
                + waited.stderr
                + json.dumps(lines)
                + json.dumps(usage)
            )
        finally:
            for process in workers:
                process.terminate()
            for process in workers:
                process.wait(timeout=30)
        stats = standin.stats()
    if "RERANK_REDIS_URL" not in env:
        embedded.stop_embedded_redis(work / "data")
    exact = sum(
        line["results"] == rank(r["query"], r["documents"], r.get("top_n"), False)[0]
        for line, r in zip(lines, requests, strict=True)
    )
    logs = "".join(p.read_text(errors="replace") for p in work.glob("*.log"))
    leaked = any(secret in blob for secret in SECRETS.values() for blob in (logs, outputs))
    total = stats["total"]
    figures = {
        "requests": len(requests),
        "succeeded": sum(line["status"] == "succeeded" for line in lines),
        "failed": sum(line["status"] == "failed" for line in lines),
        "rankings exactly as the API gave them": exact,
        "wall time from submit to completed (s)": round(elapsed_s, 2),
        "upstream calls": total["calls"],
        "answered 200": total["ok"],
        "answered 5xx": sum(v for k, v in total["status_counts"].items() if k.startswith("5")),
        "answered 429": total["status_counts"].get("429", 0),
        "dropped connections": total["drops"],
        "max in flight alpha (limit 3)": stats["keys"]["alpha"]["max_in_flight"],
        "max in flight beta (limit 2)": stats["keys"]["beta"]["max_in_flight"],
        "calls inside a 429 pause": total["calls_during_pause"],
        "tokens billed by the API": total["tokens_billed"],
        "tokens in usage": usage["total_tokens"],
        "cost (PTC)": usage["cost"],
        "secret found in logs or output": leaked,
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
