"""Interactive latency while a bulk job saturates the keys (issue 4, target 4).

    python scripts/bench_interactive.py                      # 6,000 bulk requests, 10 samples
    python scripts/bench_interactive.py --bulk-requests 4000 --samples 5

One `rerank-worker worker` at default settings works through a large bulk job against the
stand-in (4 keys x 8 slots, 100 ms). Once the keys are full, one-request interactive jobs are
submitted one at a time with `worker.service.submit_job` in this process (no CLI start-up),
each timed until `job_status` says `completed` (polled every 10 ms).

It publishes from this process, so it sets the RERANK_* variables here before the Celery app
is first imported; run it in a process that has not published to another broker before.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import KEYS, LATENCY_MS, SLOTS_PER_KEY, Services, services, worker, write_requests
from sqlalchemy import func, select

from worker.db.base import utcnow
from worker.db.models import UpstreamCall
from worker.settings import Settings, get_settings

POLL_S = 0.01
# Gap between two interactive submissions, so each one meets a full pipeline.
GAP_S = 0.5
INTERACTIVE_DOCUMENTS = 10
DONE = ("completed", "cancelled", "failed")


def use_env(env: dict[str, str]) -> Settings:
    """Point this process at the bench's services, as a worker host would be."""
    for key in [k for k in os.environ if k.startswith("RERANK_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("RERANK_")})
    get_settings.cache_clear()
    from worker.celery_app import app

    if app.conf.broker_url != env["RERANK_REDIS_URL"]:
        raise RuntimeError("the Celery app was created for another broker in this process")
    return get_settings()


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = POLL_S
) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)
    return value


def wait_saturated(svc: Services, timeout_s: float = 120) -> None:
    """Until the bulk job has made enough calls to have filled the worker's pipeline."""
    slots = len(KEYS) * SLOTS_PER_KEY
    wait_until(
        lambda: svc.stats()["total"]["ok"] >= 4 * slots,
        timeout_s,
        "the bulk job to fill the keys",
        every_s=0.05,
    )


def interactive_line(sample: int) -> bytes:
    """A fresh query each time, so no answer can come from a cache."""
    tag = uuid.uuid4().hex
    documents = [f"interactive doc {j} {tag}" for j in range(INTERACTIVE_DOCUMENTS)]
    request = {"custom_id": f"i{sample}", "query": f"interactive {tag}", "documents": documents}
    return json.dumps(request).encode() + b"\n"


def first_call_after_ms(settings: Settings, job_id: str, submitted_at: dt.datetime) -> float:
    """From submit to the start of the job's first upstream call (wall clocks, one host)."""
    from worker.service import sessions

    with sessions(settings)() as session:
        started = session.scalar(
            select(func.min(UpstreamCall.created_at)).where(UpstreamCall.job_id == job_id)
        )
    if started is None:
        raise RuntimeError(f"job {job_id} completed without an upstream call")
    return (started - submitted_at).total_seconds() * 1000


def time_interactive(settings: Settings, sample: int) -> tuple[float, float]:
    """Submit one one-request interactive job; (ms until completed, ms until its call)."""
    from worker.service import job_status, submit_job

    submitted_at = utcnow()
    started = time.monotonic()
    job = submit_job(
        [interactive_line(sample)], source="bench-interactive", priority="interactive",
        settings=settings,
    )  # fmt: skip
    status = wait_until(
        lambda: (s := job_status(job.job_id, settings))["status"] in DONE and s,
        60,
        f"interactive job {sample}",
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    if status["status"] != "completed" or status["succeeded"] != 1:
        raise RuntimeError(f"interactive job {sample} ended {status}")
    return elapsed_ms, first_call_after_ms(settings, job.job_id, submitted_at)


def submit_bulk(settings: Settings, path: Path) -> str:
    from worker.service import submit_job

    with path.open("rb") as lines:
        return submit_job(lines, source=str(path), priority="bulk", settings=settings).job_id


def bench_interactive(
    bulk_requests: int = 6000,
    samples: int = 10,
    docs: int = 10,
    latency_ms: float = LATENCY_MS,
    worker_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Interactive submit-to-completed latency while one worker is saturated by bulk."""
    from worker.service import job_status

    with services(latency_ms) as svc:
        env = svc.env()
        settings = use_env(env)
        path = svc.workdir / "bulk.jsonl"
        write_requests(path, bulk_requests, docs)
        with worker(env, *worker_args):
            bulk_id = submit_bulk(settings, path)
            wait_saturated(svc)
            ok_before, started = svc.stats()["total"]["ok"], time.monotonic()
            latencies, to_call = [], []
            for sample in range(samples):
                elapsed_ms, call_ms = time_interactive(settings, sample)
                latencies.append(elapsed_ms)
                to_call.append(call_ms)
                time.sleep(GAP_S)
            window_s = time.monotonic() - started
            bulk_calls = svc.stats()["total"]["ok"] - ok_before - samples
            bulk = job_status(bulk_id, settings)
    if bulk["pending"] == 0:
        raise RuntimeError("the bulk job ended before the last sample: raise --bulk-requests")
    return {
        "samples": samples,
        "interactive_latency_ms_median": round(statistics.median(latencies), 1),
        "interactive_latency_ms_max": round(max(latencies), 1),
        "interactive_to_first_call_ms_median": round(statistics.median(to_call), 1),
        "interactive_to_first_call_ms_max": round(max(to_call), 1),
        "bulk_calls_per_s_during": round(bulk_calls / window_s, 1),
        "limit_calls_per_s": round(len(KEYS) * SLOTS_PER_KEY / (latency_ms / 1000), 1),
        "bulk_pending_after": bulk["pending"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bulk-requests", type=int, default=6000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    parser.add_argument("--worker-args", default="", help="extra arguments for the worker")
    args = parser.parse_args()
    figures = bench_interactive(
        args.bulk_requests, args.samples, args.docs, args.latency_ms,
        tuple(args.worker_args.split()),
    )  # fmt: skip
    json.dump(figures, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
