"""Loopback stand-in for 302.AI's Jina rerank API, with fault injection for tests and benchmarks."""

from __future__ import annotations

from worker.standin.config import StandinConfig, parse_keys
from worker.standin.server import StandinServer, ThreadedStandin, run_in_thread

__all__ = ["StandinConfig", "StandinServer", "ThreadedStandin", "parse_keys", "run_in_thread"]
