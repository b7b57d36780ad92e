"""The Prometheus metrics of rerank-worker (CONTRACT.md, "Metrics and dashboard").

What the processes count (calls, tokens, durations, finished requests, pauses, rescues) are
metrics of this module, updated where it happens. `rerank-worker worker --metrics-port` runs
its Celery processes with PROMETHEUS_MULTIPROC_DIR set, so each one writes its values to
mmapped files there, and the supervising parent serves their sum (`serve_worker_metrics`).

What is state in Redis (slots in use, pauses, retirements, queue depths) is read when the
scrape comes, by `RedisStateCollector`, in the serving process: a parent's registry or the
API's, never a multiprocess child's, where custom collectors are not merged. Every host that
serves it shows the same values (they are the cluster's): aggregate them with `max`.

Labels are bounded: key NAMEs, models, HTTP statuses and a few fixed words; never a job id.
Counting is per upstream call or per finished request, never per document.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import broker, keystate
from worker.settings import ApiKey, Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Upstream calls take tens of milliseconds to the whole call timeout (60 s by default).
DURATION_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

UPSTREAM_CALLS = Counter(
    "rerank_upstream_calls",
    "Upstream attempts, whatever their answer; status is the HTTP status, timeout or connection.",
    ["key", "model", "status"],
)
UPSTREAM_CALL_DURATION = Histogram(
    "rerank_upstream_call_duration_seconds",
    "Time of one upstream attempt, from sending to the answer read (or the failure).",
    ["key", "model"],
    buckets=DURATION_BUCKETS_S,
)
TOKENS = Counter(
    "rerank_tokens", "Tokens billed by the upstream, as its answers count them.", ["key", "model"]
)
REQUESTS_FINISHED = Counter(
    "rerank_requests_finished",
    "Requests a worker finished: succeeded, failed or cancelled.",
    ["status"],
)
CACHE_HITS = Counter("rerank_cache_hits", "Documents scored from the score cache, not upstream.")
CACHE_TOKENS_SAVED = Counter(
    "rerank_cache_tokens_saved", "Tokens the score cache's hits would have cost upstream."
)
KEY_PAUSES = Counter(
    "rerank_key_pauses", "429 answers that paused a key for every worker.", ["key"]
)
KEY_RETIREMENTS = Counter(
    "rerank_key_retirements",
    "Answers that took a key out of use (401/403, balance, credentials, quota).",
    ["key", "status"],
)
SWEEPER_REQUEUED = Counter(
    "rerank_sweeper_requeued_requests",
    "Requests the sweeper sent again: an expired lease (a dead worker's) or a lost message.",
    ["reason"],
)
POISON_REQUESTS = Counter(
    "rerank_poison_requests", "Requests failed as poison after too many deliveries."
)
WEBHOOK_DELIVERIES = Counter(
    "rerank_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered (2xx), failed (will retry), gave_up.",
    ["outcome"],
)
# Set by whoever enforces RPM/TPM, from the key's configuration; the same in every process.
# What an attempt's outcome (the notification's status after it) is counted as.
_WEBHOOK_OUTCOMES = {"delivered": "delivered", "pending": "failed", "failed": "gave_up"}


def count_webhook_attempt(status_after: str) -> None:
    WEBHOOK_DELIVERIES.labels(_WEBHOOK_OUTCOMES[status_after]).inc()


KEY_RPM_LIMIT = Gauge(
    "rerank_key_rpm_limit",
    "Calls a key may make in any 60 s window.",
    ["key"],
    multiprocess_mode="livemax",
)
KEY_TPM_LIMIT = Gauge(
    "rerank_key_tpm_limit",
    "Tokens a key may be billed in any 60 s window.",
    ["key"],
    multiprocess_mode="livemax",
)


def show_rate_limits(keys: Sequence[ApiKey]) -> None:
    """The keys' rpm / tpm, for headroom alerts beside the calls and tokens counted."""
    for key in keys:
        if key.rpm:
            KEY_RPM_LIMIT.labels(key.name).set(key.rpm)
        if key.tpm:
            KEY_TPM_LIMIT.labels(key.name).set(key.tpm)


# labels() takes a lock and checks its arguments on every call; the hot path asks a dict.
_call_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
_finished_children: dict[str, Any] = {}


def call_status(status_code: int | None, transport_error: str | None) -> str:
    """The `status` label: the HTTP status, else `timeout` or `connection`."""
    if status_code is not None:
        return str(status_code)
    return transport_error or "connection"


def count_call(key: str, model: str, status: str, duration_s: float, tokens: int) -> None:
    """One upstream attempt."""
    children = _call_children.get((key, model, status))
    if children is None:
        children = _call_children[(key, model, status)] = (
            UPSTREAM_CALLS.labels(key, model, status),
            UPSTREAM_CALL_DURATION.labels(key, model),
            TOKENS.labels(key, model),
        )
    calls, duration, billed = children
    calls.inc()
    duration.observe(duration_s)
    if tokens:
        billed.inc(tokens)


def count_finished(status: str, cache_hits: int, tokens_saved: int) -> None:
    """One request finished by a worker."""
    finished = _finished_children.get(status)
    if finished is None:
        finished = _finished_children[status] = REQUESTS_FINISHED.labels(status)
    finished.inc()
    if cache_hits:
        CACHE_HITS.inc(cache_hits)
        CACHE_TOKENS_SAVED.inc(tokens_saved)


class RedisStateCollector(Collector):
    """Gauges of what Redis holds now, read in one round trip when the scrape comes. The
    keys are the configured ones, or (in the API, which has none) those workers published."""

    def __init__(
        self,
        client: redis.Redis,
        queue_depths: Callable[[], dict[str, int]],
        keys: Sequence[ApiKey] = (),
    ) -> None:
        self._client = client
        self._queue_depths = queue_depths
        self._keys = tuple(keys)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("rerank_redis_up", "Whether Redis answered this scrape.")
        try:
            state = self._read()
        except redis.exceptions.RedisError as exc:
            log.warning("action=metrics_redis_unread reason=%s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from state

    def _read(self) -> list[Metric]:
        states = keystate.read(self._client, keystate.known_keys(self._client, self._keys))
        depths = self._queue_depths()
        family = functools.partial(GaugeMetricFamily, labels=["key"])
        in_use = family("rerank_key_slots_in_use", "Upstream calls a key has in flight now.")
        limit = family("rerank_key_slots_limit", "Calls a key may have in flight at once.")
        paused = family(
            "rerank_key_paused_seconds", "Seconds left of a key's pause after a 429 (0: none)."
        )
        retired = family(
            "rerank_key_out_of_use",
            "1 while a key is out of use (balance, credentials, quota), else 0.",
        )
        for key in states:
            in_use.add_metric([key.name], key.slots_in_use)
            limit.add_metric([key.name], key.slots_limit)
            paused.add_metric([key.name], key.paused_s)
            retired.add_metric([key.name], int(key.out_of_use))
        depth = GaugeMetricFamily(
            "rerank_queue_depth", "Messages waiting in a broker queue.", labels=["queue"]
        )
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        return [in_use, limit, paused, retired, depth]


def prepare_multiprocess_dir(configured: str | None) -> Path:
    """An empty directory for the processes' metric files: `configured` emptied, or a new
    temporary one (so two workers on one host never share one)."""
    if configured:
        path = Path(configured)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path
    return Path(tempfile.mkdtemp(prefix="rerank-metrics-"))


class WorkerMetricsServer:
    """The supervisor's /metrics: every child's files summed, plus the Redis state."""

    def __init__(
        self,
        directory: Path,
        *,
        host: str,
        port: int,
        collectors: Iterable[Collector] = (),
        remove_directory: bool = False,
    ) -> None:
        self.directory = directory
        self._remove = remove_directory
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        for collector in collectors:
            registry.register(collector)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def process_ended(self, pid: int) -> None:
        """Drop a dead child's live gauges (its counters stay in the sum)."""
        multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def child_environment(directory: Path) -> dict[str, str]:
    """The variables a child needs to write its metrics where the server reads them."""
    return {MULTIPROC_ENV: str(directory)}


@contextlib.contextmanager
def serving(
    *, host: str, port: int, settings: Settings, redis_client: redis.Redis
) -> Iterator[WorkerMetricsServer]:
    """Serve the worker's metrics for the duration of the block."""
    configured = os.environ.get(MULTIPROC_ENV)
    directory = prepare_multiprocess_dir(configured)
    server = WorkerMetricsServer(
        directory,
        host=host,
        port=port,
        collectors=[
            RedisStateCollector(
                redis_client, functools.partial(broker.queue_depths, settings), settings.keys
            )
        ],
        remove_directory=configured is None,
    )
    log.info("action=metrics_serving host=%s port=%d", host, server.port)
    try:
        yield server
    finally:
        server.close()
