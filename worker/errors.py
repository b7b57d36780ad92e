"""The exception tree of rerank-worker.

RerankError
├── ConfigError            settings that cannot work (no key for the real API, bad key list)
├── InputError             a bad line in a requests file (carries line and field)
├── JobNotFound
├── JobNotFinished         retry asked of a job that is still queued or running
├── RerankFailed           a synchronous rerank's request failed (carries its error type)
│   └── RerankTimedOut     it did not end within its deadline
├── StorageError           a database failure, translated at the repository edge
├── BudgetExceeded         a job's token or cost cap leaves no room for another call
└── UpstreamError          one upstream call failed (carries key NAME and status, never a secret)
    ├── RetryableError     timeouts, dropped connections, 408, 429, 5xx, 302.AI -10003/-10008/-1024
    │   ├── UpstreamTimeout    no whole answer within the call timeout
    │   ├── ConnectionFailed   the connection failed or dropped before an answer
    │   └── RateLimited    429: pauses the key for every worker
    ├── KeyUnusable        401/403, balance, quota: the key is taken out of use
    ├── RequestRejected    any other 4xx: fails the request with the upstream's message
    └── NoUsableKey        every configured key is out of use
"""

from __future__ import annotations


class RerankError(Exception):
    """Root of every error rerank-worker raises on purpose."""


class ConfigError(RerankError):
    pass


class JobNotFound(RerankError):
    pass


class JobNotFinished(RerankError):
    pass


class StorageError(RerankError):
    """The database failed (not because of a value in the input)."""


class InputError(RerankError):
    """A requests file is bad; names the line (1-based) and the field."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        self.line = line
        self.field = field
        self.reason = message
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class UpstreamError(RerankError):
    """One upstream call failed. `kind` is the short type written into results."""

    kind = "upstream_error"
    # Why no HTTP status came back, for metrics: "timeout" or "connection".
    transport_error: str | None = None

    def __init__(
        self,
        message: str,
        *,
        key_name: str | None = None,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key_name = key_name
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class RetryableError(UpstreamError):
    kind = "upstream_unavailable"


class UpstreamTimeout(RetryableError):
    transport_error = "timeout"


class ConnectionFailed(RetryableError):
    transport_error = "connection"


class RateLimited(RetryableError):
    kind = "rate_limited"


class KeyUnusable(UpstreamError):
    """The key cannot be used: `until_s` is how long (None: until restart of the config)."""

    kind = "key_unusable"

    def __init__(self, message: str, *, until_s: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.until_s = until_s


class RequestRejected(UpstreamError):
    kind = "invalid_request"


class NoUsableKey(UpstreamError):
    kind = "no_usable_key"


class BudgetExceeded(RerankError):
    """A call was not started: its job's cap was reached (the request fails with this)."""

    kind = "budget_exceeded"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Cancelled(RerankError):
    """The job was cancelled while a call waited for a slot."""


class RerankFailed(RerankError):
    """A synchronous rerank ended without a ranking; `kind` is the request's error type
    (invalid_request, upstream_unavailable, no_usable_key, ...) as in its result line."""

    def __init__(self, kind: str, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.job_id = job_id


class RerankTimedOut(RerankFailed):
    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__("timeout", message, job_id=job_id)
