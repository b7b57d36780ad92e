"""`rerank-worker worker` as several Celery worker processes, each with a share of the slots.

A worker process makes its upstream calls on one event loop that shares a GIL with its
claims and its recorder, so past a few dozen slots one process cannot keep every slot
busy. Several processes can; each is a whole Celery worker (threads pool) with a node name
of its own, and takes at most its share of the slots at once (`RERANK_PROCESS_SLOTS`), so
the processes do not poll Redis for one another's slots.

The parent only supervises. It passes SIGTERM and SIGQUIT on to its children, and SIGINT as
SIGTERM, because a terminal's Ctrl-C reaches the children directly too and a second SIGINT
would make Celery shut down cold. When one child ends, the parent stops the others (a warm
shutdown) and exits with that child's status, for whatever restarts the worker (a container
runtime or systemd) to start it again whole.

With `--metrics-port`, the parent also serves the children's metrics as one view: they
write them to files in one directory (prometheus_client's multiprocess mode), which the
parent empties before the first child starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from worker import constants, logs, metrics
from worker.metrics import WorkerMetricsServer, child_environment
from worker.redis_clients import redis_url, sync_redis
from worker.settings import Settings

log = logging.getLogger(__name__)

FORWARDED = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGTERM,
    signal.SIGQUIT: signal.SIGQUIT,
}


def default_processes(settings: Settings) -> int:
    """One process per `SLOTS_PER_PROCESS` slots, at most one per CPU core it may run on."""
    wanted = math.ceil(settings.total_slots / constants.SLOTS_PER_PROCESS)
    return max(1, min(wanted, usable_cpus()))


def usable_cpus() -> int:
    """The cores this process may run on (a container's cpuset), else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def node_name(hostname: str | None, index: int) -> str:
    """`NAME-i@HOST` for a given `NAME@HOST`, else `rerank-i@%h` (Celery expands %h)."""
    if not hostname:
        return f"rerank-{index}@%h"
    name, at, host = hostname.partition("@")
    return f"{name}-{index}{at}{host}"


def run(
    count: int,
    settings: Settings,
    hostname: str | None,
    worker_args: Sequence[str],
    metrics: WorkerMetricsServer | None = None,
) -> int:
    """Run `count` worker processes until one ends; the exit status to leave with. With
    `metrics`, the children write their metrics where that server reads them."""
    env = dict(os.environ, RERANK_PROCESS_SLOTS=str(math.ceil(settings.total_slots / count)))
    if metrics is not None:
        env.update(child_environment(metrics.directory))
    command = [sys.executable, "-m", "worker", "worker", "--processes", "1"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        # os.kill, not Popen.send_signal: that polls, and could reap the child os.wait awaits.
        nonlocal stopping
        stopping = True
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, FORWARDED[signal.Signals(signum)])

    for signum in FORWARDED:  # before any child exists, so none is left behind
        signal.signal(signum, forward)
    for i in range(1, count + 1):
        if stopping:
            break
        node = ["--hostname", node_name(hostname, i)]
        children.append(subprocess.Popen([*command, *node, *worker_args], env=env))
    pid, status = os.wait()
    first = next(child for child in children if child.pid == pid)
    first.returncode = os.waitstatus_to_exitcode(status)
    if not stopping:
        log.error("action=worker_process_ended pid=%d status=%d", pid, first.returncode)
        forward(signal.SIGTERM, None)
    for child in children:
        child.wait()
        if metrics is not None:
            metrics.process_ended(child.pid)
    return first.returncode if first.returncode >= 0 else 128 - first.returncode


def run_with_metrics(
    count: int,
    settings: Settings,
    hostname: str | None,
    worker_args: Sequence[str],
    *,
    host: str,
    port: int,
    log_level: str,
) -> int:
    """`run`, with the children's metrics served at http://host:port/metrics."""
    logs.configure(settings.log_format, log_level, settings.secrets())
    client = sync_redis(redis_url(settings))
    with metrics.serving(host=host, port=port, settings=settings, redis_client=client) as server:
        return run(count, settings, hostname, worker_args, metrics=server)
