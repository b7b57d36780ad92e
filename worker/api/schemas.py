"""Response and parameter models: they keep /openapi.json honest about what the API answers.

The job and usage objects are those of `status --json` and `usage --json`; their models name
the fields every client may rely on and allow more, so a field added to the use case reaches
the API without a second definition here.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from worker import constants
from worker.db.models import JobStatus

Priority = Literal["interactive", "bulk"]
JobStatusName = Literal["queued", "running", "completed", "cancelled", "failed"]
# The literals repeat the enums for OpenAPI's sake; these keep them from drifting apart.
assert set(get_args(JobStatusName)) == {s.value for s in JobStatus}
assert set(get_args(Priority)) == set(constants.PRIORITIES)


class ErrorBody(BaseModel):
    type: str = Field(description="invalid_request, unauthorized, not_found, ...")
    message: str
    line: int | None = Field(None, description="1-based line of the body that is bad")
    field: str | None = Field(None, description="the field or parameter that is bad")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    total_tokens: int
    calls: int
    billed_calls: int
    cost: float


class JobSummary(BaseModel):
    """A job in a list: `rerank-worker jobs --json`."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatusName
    priority: str
    source: str | None
    total_requests: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class Job(JobSummary):
    """The job object: `rerank-worker status JOB --json`."""

    total: int
    succeeded: int
    failed: int
    cancelled: int
    pending: int
    warnings: list[str]
    usage: Usage


class JobList(BaseModel):
    data: list[JobSummary]


class UsageReport(Usage):
    """`rerank-worker usage --json`, over the caller's jobs or one of them."""

    job: str | None
    by_key_and_model: list[dict[str, object]]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: bool
    redis: bool


# What the job table's columns hold: a parameter beyond them is refused as bad input.
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_COST = 1e9
# PostgreSQL's text cannot hold NUL, so no text parameter may carry one.
NO_NUL = r"^[^\x00]*$"


class JobParameters(BaseModel):
    """The query parameters of `POST /v1/jobs`: the options of `rerank-worker submit`."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="Rank a corpus body (one document per line) against it",
    )
    model: str | None = Field(
        None, min_length=1, max_length=200, pattern=NO_NUL, description="For requests naming none"
    )
    top_n: int | None = Field(None, ge=1, le=MAX_INT32, description="Results kept per request")
    priority: Priority = "bulk"
    cache: bool = Field(True, description="Reuse and keep scores already paid for")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_INT64, description="Tokens the job may bill at most"
    )
    max_cost: float | None = Field(
        None, gt=0, lt=MAX_COST, allow_inf_nan=False, description="Cost the job may bill at most"
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        pattern=NO_NUL,
        description="POSTed a signed webhook when the job ends",
    )
    on_complete: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="A Celery task sent (job_id, status) when the job ends",
    )
    on_complete_queue: str = Field(
        constants.DEFAULT_ON_COMPLETE_QUEUE,
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="The queue of the on_complete task",
    )
