"""How long a number of calls takes at the keys' limits, before any of them is made.

The limiter runs a key's whole rpm / tpm at once and then waits for the window to turn, so
a job of more than one window's worth takes a whole window per further window's worth; the
slots bound it too (calls x the time of a call / all slots). `estimate` reports the larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from worker import constants
from worker.settings import ApiKey


def least_seconds(
    keys: Sequence[ApiKey],
    calls: int,
    tokens: int,
    call_s: float,
    window_s: float = constants.RATE_WINDOW_S,
) -> float:
    """The least time `calls` calls billing `tokens` in all take on `keys`, each call
    taking `call_s` once made. A limit counts only when every key has one (a key without
    it is unbounded there)."""
    if calls <= 0 or not keys:
        return 0.0
    by_slots_s = math.ceil(calls / sum(k.max_concurrency for k in keys)) * call_s
    windows = 0
    if all(k.rpm for k in keys):
        windows = max(windows, math.ceil(calls / sum(k.rpm or 0 for k in keys)) - 1)
    if tokens > 0 and all(k.tpm for k in keys):
        windows = max(windows, math.ceil(tokens / sum(k.tpm or 0 for k in keys)) - 1)
    if not windows:
        return by_slots_s
    # Each full window waited, plus the last window's calls at the slots' pace.
    window_total_s = windows * (window_s + constants.RATE_WINDOW_MARGIN_S)
    last_calls = calls - windows * math.ceil(calls / (windows + 1))
    last_s = math.ceil(max(last_calls, 1) / sum(k.max_concurrency for k in keys)) * call_s
    return max(by_slots_s, window_total_s + last_s)
