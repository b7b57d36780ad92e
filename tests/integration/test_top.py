"""`rerank-worker top` under a pseudo-terminal, as a person would start it: what it draws."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Env, wait_for
from jobs_support import make_requests, submit, wait_ok, write_jsonl

from worker.standin import ThreadedStandin

# Between two cells of a table row: spaces and the column rule.
SEP = r"[\s│]+"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """A command on the slave side of a pty; everything it draws, collected."""

    def __init__(self, env: Env, *args: str) -> None:
        master, slave = pty.openpty()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        environ.update(env.values, TERM="xterm-256color", COLUMNS="160", LINES="50")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            stdin=slave, stdout=slave, stderr=slave, env=environ, cwd=env.tmp_path,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self._master = master
        self.raw = b""

    def read(self, timeout_s: float = 0.2) -> str:
        ready, _, _ = select.select([self._master], [], [], timeout_s)
        if ready:
            with contextlib.suppress(OSError):  # the command ended and closed its side
                self.raw += os.read(self._master, 65536)
        return self.text()

    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self._master)


def _drawn(terminal: Terminal, job_id: str) -> str:
    """What top drew once it showed the job, alpha's slots in use and a rate of calls."""

    def shown() -> str | None:
        text = terminal.read()
        wanted = (job_id[:12] in text, re.search(rf"alpha{SEP}[1-3]/3", text),
                  re.search(r"calls/s [1-9]", text))  # fmt: skip
        return text if all(wanted) else None

    try:
        return str(wait_for(shown, 60, "top to draw the job, alpha's slots and calls/s"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it drew:\n{terminal.text()[-4000:]}") from None


def test_top_draws_the_keys_slots_a_running_job_and_calls_per_second(
    make_env: Any, sqlite_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url)
    standin.update(latency_ms=300)
    env.start_worker(concurrency=2)
    # 150 requests on 5 slots at 300 ms: about 9 s of calls, for top to start and draw.
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", make_requests(150)))
    terminal = Terminal(env, "top", "--interval", "0.3", "--window", "5")
    try:
        drawn = _drawn(terminal, job_id)
        assert re.search(rf"beta{SEP}\d/2", drawn)
        assert "jobs in flight" in drawn and "running" in drawn
        assert "sk-test" not in drawn
        terminal.process.send_signal(signal.SIGINT)
        assert terminal.process.wait(timeout=15) == 0
    finally:
        terminal.close()
    wait_ok(env, job_id)


def test_top_once_prints_one_frame_and_exits(
    make_env: Any, sqlite_url: str, redis_client: Any
) -> None:
    env: Env = make_env(sqlite_url)
    redis_client.set("rerank:pause:beta", "1", px=30_000)
    redis_client.set("rerank:revoked:alpha", "HTTP 401 from upstream on key 'alpha'", px=60_000)
    terminal = Terminal(env, "top", "--once")
    try:
        deadline = time.monotonic() + 60
        while terminal.process.poll() is None and time.monotonic() < deadline:
            terminal.read()
        assert terminal.process.wait(timeout=5) == 0
        text = terminal.read(0.5)
    finally:
        terminal.close()
    assert re.search(rf"alpha{SEP}0/3{SEP}out of use \(\d+s\)", text), text
    assert re.search(rf"beta{SEP}0/2{SEP}paused \d+\.\ds", text), text
    assert "none" in text  # no job in flight
    assert text.count("jobs in flight") == 1  # one frame
