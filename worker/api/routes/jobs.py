"""Jobs over HTTP: submit, read, wait, list, cancel, results, usage (CONTRACT.md, HTTP API).

Each route takes the caller's scope, calls the use case the CLI calls and returns its object;
the ownership check is the use cases' own (`scope.visible_job`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from worker.api import schemas, upload
from worker.api.deps import CallerDep, ScopeDep, SettingsDep
from worker.api.errors import error_response
from worker.db.models import JOB_ENDED
from worker.service import control, read
from worker.service.scope import Scope
from worker.service.submit import JobOptions
from worker.service.usage import usage_report
from worker.settings import Settings

router = APIRouter(prefix="/v1", tags=["jobs"])

MAX_WAIT_S = 60.0
WAIT_POLL_S = 0.2
WAIT_POLL_MAX_S = 1.0
NDJSON = "application/x-ndjson"
# Content types taken as JSON Lines; an absent one is too (curl --data-binary sends none
# that fits, and the body tells).
JSON_LINES_TYPES = frozenset(
    {NDJSON, "application/jsonl", "application/json-lines", "application/x-jsonlines",
     "text/plain", "application/octet-stream", ""}
)  # fmt: skip

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "Bad input: the line and field"},
    401: {"model": schemas.ErrorResponse, "description": "No valid token"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": schemas.ErrorResponse, "description": "No such job for this token"},
}

_DOCUMENT = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        {"type": "object", "properties": {"image": {"type": "string"}}, "required": ["image"]},
    ]
}
_REQUEST = {
    "type": "object",
    "properties": {
        "custom_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "query": {"type": "string", "minLength": 1},
        "documents": {"type": "array", "items": _DOCUMENT, "minItems": 1},
        "top_n": {"type": "integer", "minimum": 1},
        "model": {"type": "string", "minLength": 1},
        "return_documents": {"type": "boolean"},
    },
    "required": ["query", "documents"],
    "additionalProperties": False,
}
_REQUEST_BODY = {
    "required": True,
    "content": {
        NDJSON: {
            "schema": {"type": "string"},
            "example": '{"custom_id": "q-1", "query": "what", "documents": ["a", "b"]}\n',
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "requests": {"type": "array", "items": _REQUEST, "minItems": 1},
                    "documents": {"type": "array", "items": _DOCUMENT, "minItems": 1},
                },
            },
        },
    },
    "description": "A requests file (JSON Lines), or a corpus file when `query` is given; "
    'or application/json {"requests": [...]} ({"documents": [...]} with `query`). A bad line '
    "answers 400 naming it (for JSON, line N is the list's N-th item).",
}


def _options(params: schemas.JobParameters, idempotency_key: str | None) -> JobOptions:
    return JobOptions(
        query=params.query,
        model=params.model,
        top_n=params.top_n,
        priority=params.priority,
        idempotency_key=idempotency_key,
        use_cache=params.cache,
        webhook_url=params.webhook_url,
        on_complete=params.on_complete,
        max_tokens=params.max_tokens,
        max_cost=params.max_cost,
    )


@router.post(
    "/jobs",
    status_code=201,
    response_model=schemas.Job,
    responses={
        **ERRORS,
        200: {"model": schemas.Job, "description": "The job this Idempotency-Key made before"},
        415: {"model": schemas.ErrorResponse, "description": "Not JSON Lines nor JSON"},
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def create_job(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    params: Annotated[schemas.JobParameters, Query()],
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            pattern=schemas.NO_NUL,
            description="A repeated key answers the job it made (200) instead of a new one",
        ),
    ] = None,
) -> Response:
    """Validate the whole body, store the job and enqueue it (`rerank-worker submit`)."""
    options = _options(params, idempotency_key)
    options.check()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    submit_args: dict[str, Any] = {
        "options": options,
        "tenant_id": caller.tenant_id,
        "settings": settings,
        "source": f"api:{caller.name}",
    }
    if media_type == "application/json":
        result = await upload.submit_json(request.stream(), **submit_args)
    elif media_type in JSON_LINES_TYPES:
        result = await upload.submit_stream(request.stream(), **submit_args)
    else:
        return error_response(
            415, f"Content-Type must be {NDJSON} or application/json, not {media_type}"
        )
    job = await run_in_threadpool(read.job_status, result.job_id, settings, caller.scope)
    return JSONResponse(
        schemas.Job.model_validate(job).model_dump(mode="json"),
        status_code=200 if result.existing else 201,
        headers={"Location": f"/v1/jobs/{result.job_id}"},
    )


@router.get("/jobs", response_model=schemas.JobList, responses=ERRORS)
def list_jobs(
    scope: ScopeDep,
    settings: SettingsDep,
    status: schemas.JobStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """The caller's jobs, newest first (`rerank-worker jobs`)."""
    return {"data": read.list_jobs(status, limit, settings, scope)}


@router.get("/jobs/{job_id}", response_model=schemas.Job, responses=NOT_FOUND)
async def get_job(
    job_id: str,
    scope: ScopeDep,
    settings: SettingsDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="Hold the answer until the job ends")
    ] = 0,
) -> dict[str, Any]:
    """The job object (`rerank-worker status --json`); with `wait`, once the job ended or
    that many seconds passed."""
    if wait > 0:
        await _wait_until_ended(job_id, scope, settings, wait)
    return await run_in_threadpool(read.job_status, job_id, settings, scope)


async def _wait_until_ended(job_id: str, scope: Scope, settings: Settings, wait_s: float) -> None:
    """Poll the job's status in SQL, more slowly as the wait goes on: any API process
    answers, whichever worker ends the job."""
    deadline = time.monotonic() + wait_s
    interval_s = WAIT_POLL_S
    while True:
        status = await run_in_threadpool(read.job_state, job_id, settings, scope)
        left_s = deadline - time.monotonic()
        if status in JOB_ENDED or left_s <= 0:
            return
        await anyio.sleep(min(interval_s, left_s))
        interval_s = min(WAIT_POLL_MAX_S, interval_s * 1.5)


@router.post("/jobs/{job_id}/cancel", response_model=schemas.Job, responses=NOT_FOUND)
def cancel_job(job_id: str, scope: ScopeDep, settings: SettingsDep) -> dict[str, Any]:
    """No further upstream calls for the job; finished results stay (`rerank-worker cancel`)."""
    control.cancel_job(job_id, settings, scope)
    return read.job_status(job_id, settings, scope)


@router.get(
    "/jobs/{job_id}/results",
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        200: {
            "content": {NDJSON: {"schema": {"type": "string"}}},
            "description": "One JSON line per request, in input order",
        },
    },
)
def job_results(job_id: str, scope: ScopeDep, settings: SettingsDep) -> StreamingResponse:
    """The job's result lines in input order (`rerank-worker results`), streamed."""
    chunks = read.iter_result_chunks(job_id, settings, scope)
    return StreamingResponse(
        (chunk.encode() for chunk in chunks),
        media_type=NDJSON,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/usage", response_model=schemas.UsageReport, responses=NOT_FOUND)
def usage(
    scope: ScopeDep,
    settings: SettingsDep,
    job: Annotated[str | None, Query(description="One job's usage")] = None,
) -> dict[str, Any]:
    """Tokens, calls and cost over the caller's jobs (`rerank-worker usage --json`)."""
    return usage_report(job, settings, scope)
