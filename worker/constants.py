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

# What `estimate` assumes a call takes until calls were measured (RERANK_ESTIMATE_CALL_LATENCY_S).
DEFAULT_ESTIMATE_CALL_LATENCY_S = 1.0

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
# Keys' rpm / tpm hold in any window of this length (RERANK_RATE_WINDOW_S shrinks it for
# tests). A call counts from the moment it takes its slot and, once it has ended, from its
# end (the upstream saw it arrive in between); each entry stays this much longer than the
# window, so that a call still in flight after a whole window still counts.
RATE_WINDOW_S = 60.0
RATE_WINDOW_MARGIN_S = 0.5
# A call reserves its estimated tokens x the learnt billed/estimated ratio x this, so that
# calls in flight whose count exceeds the estimate a little do not overfill the window.
TOKEN_RESERVE_FACTOR = 1.05
# Weight of each new billed/estimated observation in the learnt ratio (an EWMA per model).
TOKEN_RATIO_ALPHA = 0.2
# A process sends what it saw of a model's calls with its next slot attempt, at most this
# often (the first at once), so that busy workers do not update the ratio on every call.
TOKEN_RATIO_SEND_S = 0.25
# Quota counters outlive their UTC period by a margin, then expire.
DAILY_QUOTA_TTL_S = 2 * 24 * 3600
MONTHLY_QUOTA_TTL_S = 32 * 24 * 3600
# While Redis is unreachable, slot takers retry with backoff up to this interval.
REDIS_RETRY_MAX_S = 2.0

# Requests are claimed with a lease in SQL; the sweeper re-enqueues expired ones.
REQUEST_LEASE_S = 30.0
# A large submit stores its job batch by batch, renewing this lease each time; a job whose
# lease ran out (its submit died) is failed by the sweeper.
STORING_LEASE_S = 30.0
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
# `rerank-worker worker` runs one process per this many slots (at most one per CPU core).
# One process keeps 32 slots of 100 ms calls busy at under half of a slow core's time
# (1.7 ms of CPU per call, 2026-12-03); a second process for them cost 2.0 to 2.1 ms per call
# (its own recorder, lookout, Celery threads and Redis polls) and gained no calls/s.
SLOTS_PER_PROCESS = 32
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
# Rate windows of a key: call start times; token reservation times, and their amounts
# (hash field = call token) with the window's total in field "sum".
RATE_CALLS_KEY = REDIS_PREFIX + "rate:calls:{name}"
RATE_TOKEN_TIMES_KEY = REDIS_PREFIX + "rate:token-times:{name}"
RATE_TOKEN_AMOUNTS_KEY = REDIS_PREFIX + "rate:token-amounts:{name}"
# The learnt billed/estimated token ratio per model (hash field = model).
TOKEN_RATIO_KEY = REDIS_PREFIX + "token-ratio"
# Tokens billed to a key in a UTC day (YYYY-MM-DD) / month (YYYY-MM).
DAILY_TOKENS_KEY = REDIS_PREFIX + "quota:day:{name}:{day}"
MONTHLY_TOKENS_KEY = REDIS_PREFIX + "quota:month:{name}:{month}"
SWEEPER_LOCK_KEY = REDIS_PREFIX + "sweeper-lock"
# A list a worker pushes to once it has committed the end of an interactive job; whoever
# waits for that job (a synchronous rerank) BLPOPs it. It outlives a late waiter briefly.
JOB_ENDED_KEY = REDIS_PREFIX + "job-ended:{job_id}"
JOB_ENDED_TTL_S = 120

CANCEL_MARK_TTL_S = 7 * 24 * 3600
# A job's budget hash (spent and reserved tokens and cost) outlives its last call by this.
BUDGET_KEY = REDIS_PREFIX + "budget:{job_id}"
BUDGET_TTL_S = 7 * 24 * 3600

# A synchronous rerank waits this long for its job, by default; between two looks at the
# completion list it reads the job's status in SQL once, in case a notice was lost.
DEFAULT_SYNC_TIMEOUT_S = 120.0
SYNC_STATUS_CHECK_S = 1.0

# Where `rerank-worker api` listens unless told otherwise.
API_HOST = "127.0.0.1"
API_PORT = 8080

# Input caps. A line, a document and a request are bounded so that one stranger's input cannot
# take a process's memory; the defaults here are settings (RERANK_MAX_LINE_BYTES, ...).
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_DOCUMENT_CHARS = 8 * 1024 * 1024
DEFAULT_MAX_DOCUMENTS_PER_REQUEST = 100_000
DEFAULT_MAX_QUERY_CHARS = 1024 * 1024
# These follow the columns that store them (worker/db/models.py), so they are not settings.
MAX_CUSTOM_ID_CHARS = 200
MAX_MODEL_CHARS = 100
MAX_DOC_ID_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_WEBHOOK_URL_CHARS = 2000
MAX_TASK_NAME_CHARS = 200
MAX_SOURCE_CHARS = 500
MAX_TOP_N = 2**31 - 1  # INTEGER
MAX_TOKENS_CAP = 2**63 - 1  # BIGINT
MAX_COST_CAP = 10**9  # NUMERIC(18, 9) holds less than this
# Accepted input nests 3 levels deep at most; anything deeper than this is refused as such,
# well below the depth where Python's JSON parser runs out of stack.
MAX_JSON_DEPTH = 32

# Completion notifications (webhooks and the Celery callback), delivered from an outbox in SQL.
# Attempts per notification, and the pause after each failed one: Svix's schedule (its first
# retry 5 s after the first attempt), held at its last step once it runs out.
DEFAULT_WEBHOOK_MAX_ATTEMPTS = 10
DEFAULT_WEBHOOK_RETRY_SCHEDULE_S = "5,300,1800,7200,18000,36000"
# One POST (connect, send, wait, read) must finish within this.
WEBHOOK_TIMEOUT_S = 10.0
# A delivery in progress is leased for this long; past it, another worker sends it again.
WEBHOOK_LEASE_S = 60.0
# How often a worker's delivery thread looks for due notifications, and how many it sends at once.
WEBHOOK_POLL_INTERVAL_S = 1.0
WEBHOOK_BATCH = 8
# A Celery callback goes to this queue unless the job names another.
DEFAULT_ON_COMPLETE_QUEUE = "celery"
