"""Every default, cap and Redis key prefix in one place; no logic."""

from __future__ import annotations

DEFAULT_API_BASE = "https://api.302.ai"
DEFAULT_MODEL = "jina-reranker-m0"
DEFAULT_MAX_CONCURRENCY_PER_KEY = 4
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_DATA_DIR = ".rerank"

# Upstream HTTP: a whole call (connect, send, wait, read) must finish within this.
DEFAULT_CALL_TIMEOUT_S = 60.0
# Backoff: full jitter over min(base * 2**n, cap); a Retry-After above the cap
# is still honoured, up to MAX_RETRY_AFTER_S, beyond which the key is paused that long.
DEFAULT_BACKOFF_BASE_S = 0.5
DEFAULT_BACKOFF_CAP_S = 8.0
MAX_RETRY_AFTER_S = 3600.0

# A key slot is a lease; it outlives the longest call by this margin, so a dead
# worker's slot comes back by itself and a live one never loses it mid-call.
SLOT_LEASE_MARGIN_S = 5.0
# How long a waiting caller sleeps between attempts to take a slot (grows to the max).
SLOT_POLL_MIN_S = 0.002
SLOT_POLL_MAX_S = 0.05
# An interactive taker looks again sooner (its pause grows to this), and while it waits it
# holds bulk takers back for this long after each attempt (if its process dies, no longer).
INTERACTIVE_POLL_MAX_S = 0.01
INTERACTIVE_GATE_S = 0.5
# While Redis is unreachable, slot takers retry with backoff up to this interval.
REDIS_RETRY_MAX_S = 2.0

# Requests are claimed with a lease in SQL; the sweeper re-enqueues expired ones.
REQUEST_LEASE_S = 30.0
SWEEP_INTERVAL_S = 5.0
# A queued request whose message is older than this, with its queue empty, is re-sent.
DISPATCH_STALE_S = 30.0
# A request delivered this many times without finishing is failed as poison.
MAX_DELIVERIES = 5

# The one Celery task; producers send it by name, without importing the worker's code.
RUN_REQUESTS_TASK = "rerank.run_requests"
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"
PRIORITIES = (QUEUE_INTERACTIVE, QUEUE_BULK)
# Requests sent to a worker in one Celery message; they run concurrently there.
REQUESTS_PER_TASK = {QUEUE_INTERACTIVE: 1, QUEUE_BULK: 32}
# The recorder writes the requests that finished in this interval in one transaction.
RECORD_INTERVAL_S = 0.05
# `rerank-worker worker` runs one process per this many slots (at most one per CPU core):
# one event loop sharing its GIL with claims and writes keeps about this many calls busy.
SLOTS_PER_PROCESS = 16
# Requests a worker process holds at once (claimed, waiting for a slot or in flight).
BACKLOG_PER_SLOT = 3
MIN_BACKLOG = 32
# While every task thread of a worker waits for room, it checks this often whether an
# interactive message is queued (and then frees one thread for it).
INTERACTIVE_LOOKOUT_S = 0.02

# Redis keys. {name} is a key NAME, never a secret.
REDIS_PREFIX = "rerank:"
SLOTS_KEY = REDIS_PREFIX + "slots:{name}"
PAUSE_KEY = REDIS_PREFIX + "pause:{name}"
REVOKED_KEY = REDIS_PREFIX + "revoked:{name}"
CANCELLED_JOB_KEY = REDIS_PREFIX + "cancelled:{job_id}"
# Interactive slot takers waiting anywhere (member: token, score: expiry in Redis ms).
INTERACTIVE_WAITERS_KEY = REDIS_PREFIX + "interactive-waiting"
SWEEPER_LOCK_KEY = REDIS_PREFIX + "sweeper-lock"

CANCEL_MARK_TTL_S = 7 * 24 * 3600

# Where `rerank-worker api` listens unless told otherwise.
API_HOST = "127.0.0.1"
API_PORT = 8080
