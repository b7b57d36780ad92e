"""`rerank-worker top`: a live terminal view of the keys, the jobs in flight and calls/s.

For when no browser is at hand. It reads only aggregates: the keys' state from Redis, the
open jobs' counts and the last seconds' calls from SQL, once per refresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from worker.db import insight
from worker.service import overview
from worker.settings import Settings

JOBS_SHOWN = 10


@dataclass(frozen=True)
class Frame:
    keys: overview.KeysView
    jobs: list[insight.JobProgress]
    recent: list[insight.RecentCalls]
    window_s: float


def snapshot(settings: Settings, window_s: float) -> Frame:
    return Frame(
        keys=overview.keys_view(settings),
        jobs=overview.jobs(settings=settings, limit=JOBS_SHOWN, open_only=True),
        recent=overview.recent_calls(window_s, settings),
        window_s=window_s,
    )


def _key_state(paused_s: float, out_of_use: bool, out_of_use_s: float | None) -> Text:
    if out_of_use:
        until = "until restart" if out_of_use_s is None else f"{out_of_use_s:.0f}s"
        return Text(f"out of use ({until})", style="bold red")
    if paused_s > 0:
        return Text(f"paused {paused_s:.1f}s", style="yellow")
    return Text("ok", style="green")


def render(frame: Frame) -> Group:
    recent = {r.key_name: r for r in frame.recent}
    keys = Table(title="keys", title_justify="left", expand=True)
    for column in ("key", "slots", "state", "calls/s", "429/s", "tokens/s", "rpm", "tpm"):
        keys.add_column(column, justify="left" if column in ("key", "state") else "right")
    for key in frame.keys.keys:
        calls = recent.get(key.name)
        keys.add_row(
            key.name,
            f"{key.slots_in_use}/{key.slots_limit}",
            _key_state(key.paused_s, key.out_of_use, key.out_of_use_s),
            f"{(calls.calls if calls else 0) / frame.window_s:.1f}",
            f"{(calls.rate_limited if calls else 0) / frame.window_s:.1f}",
            f"{(calls.tokens if calls else 0) / frame.window_s:.0f}",
            str(key.rpm or "-"),
            str(key.tpm or "-"),
        )
    total_calls = sum(r.calls for r in frame.recent)
    queues = "  ".join(f"{name} {depth}" for name, depth in frame.keys.queues.items())
    summary = Text(
        f"calls/s {total_calls / frame.window_s:.1f} (last {frame.window_s:g}s)   "
        f"queued messages: {queues}"
    )
    jobs = Table(title="jobs in flight", title_justify="left", expand=True)
    for column in ("job", "status", "priority", "progress", "done", "failed"):
        jobs.add_column(column, justify="right" if column in ("done", "failed") else "left")
    for job in frame.jobs:
        jobs.add_row(
            job.id[:12],
            job.status,
            job.priority,
            ProgressBar(total=max(job.total, 1), completed=job.done, width=30),
            f"{job.done}/{job.total}",
            str(job.failed),
        )
    if not frame.jobs:
        jobs.add_row("none", "", "", "", "", "")
    return Group(keys, summary, jobs)


def run(
    console: Console, settings: Settings, *, interval_s: float, window_s: float, once: bool
) -> None:
    """Draw frames until interrupted (Ctrl-C), or one frame with `once`."""
    if once:
        console.print(render(snapshot(settings, window_s)))
        return
    with Live(render(snapshot(settings, window_s)), console=console, screen=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(render(snapshot(settings, window_s)))
        except KeyboardInterrupt:
            pass
