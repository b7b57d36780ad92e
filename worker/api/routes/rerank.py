"""Synchronous rerank, a drop-in for Jina's and Cohere's clients: change their base URL.

`POST /v1/rerank` and `/jina/v1/rerank` take Jina's body and answer Jina's shape; `POST
/v2/rerank` takes Cohere v2's and answers Cohere's. Each runs as a one-request interactive job
of the caller (worker/service/rerank.py). A failed request answers an error of the API's one
shape, with the request's own error type and the HTTP status that says whose problem it is.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from worker import errors
from worker.api.deps import ScopeDep, SettingsDep
from worker.api.schemas import ErrorResponse
from worker.redis_clients import async_redis, redis_url
from worker.service import rerank as rerank_service
from worker.settings import Settings

router = APIRouter(tags=["rerank"])

# A failed request's error type, and the status it answers: the caller's mistake (4xx), or
# the upstream's or the workers' (5xx). Any other type is the workers' too: 502.
FAILURE_STATUS = {
    "invalid_request": 400,
    "budget_exceeded": 402,
    "cancelled": 409,
    "rate_limited": 429,
    "internal_error": 500,
    "upstream_unavailable": 502,
    "poison": 502,
    "key_unusable": 503,
    "no_usable_key": 503,
    "timeout": 504,
}
RATE_LIMITED_RETRY_AFTER_S = 1
JOB_HEADER = "Rerank-Job-Id"

# Not blank: at least one character that is not white space (submit refuses blank text).
NOT_BLANK: dict[str, Any] = {"type": "string", "pattern": r"\S"}
DOCUMENT_SCHEMA = {
    "anyOf": [
        NOT_BLANK,
        {
            "type": "object",
            "properties": {"text": NOT_BLANK},
            "required": ["text"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"image": {**NOT_BLANK, "description": "a URL or base64"}},
            "required": ["image"],
            "additionalProperties": False,
        },
    ]
}
# Checked by submit's own parser (worker/ingest.py), whose errors name the document and field.
JinaDocument = Annotated[str | dict[str, Any], WithJsonSchema(DOCUMENT_SCHEMA)]


class JinaRerankRequest(BaseModel):
    """Jina's rerank body. Fields this API does not know are ignored, as Jina's are."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, description="default: RERANK_DEFAULT_MODEL", json_schema_extra={"pattern": r"\S"}
    )
    query: str = Field(json_schema_extra=NOT_BLANK)
    documents: list[JinaDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = Field(True, description="Jina's default: true")


class JinaUsage(BaseModel):
    total_tokens: int


class JinaResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = Field(None, description="with return_documents only")


class JinaRerankResponse(BaseModel):
    model: str
    usage: JinaUsage
    results: list[JinaResult]


class CohereRerankRequest(BaseModel):
    """Cohere v2's rerank body. `max_tokens_per_doc`, `priority` and any other field the
    Cohere SDK sends are accepted and ignored: the upstream model sets its own truncation."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, description="default: RERANK_DEFAULT_MODEL", json_schema_extra={"pattern": r"\S"}
    )
    query: str = Field(json_schema_extra=NOT_BLANK)
    documents: list[Annotated[str, WithJsonSchema(NOT_BLANK)]] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(None, description="accepted, ignored")


class CohereResult(BaseModel):
    index: int
    relevance_score: float


class CohereBilledUnits(BaseModel):
    model_config = ConfigDict(extra="allow")

    search_units: int = Field(description="billed upstream calls")
    input_tokens: int


class CohereMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    billed_units: CohereBilledUnits


class CohereRerankResponse(BaseModel):
    id: str = Field(description="the job the rerank ran as")
    results: list[CohereResult]
    meta: CohereMeta


def get_notice_redis(request: Request) -> aioredis.Redis:
    """This process's Redis client for end-of-job notices, made on first use."""
    state = request.app.state
    client: aioredis.Redis | None = getattr(state, "notice_redis", None)
    if client is None:
        settings: Settings = state.settings
        client = state.notice_redis = async_redis(redis_url(settings))
    return client


NoticeRedisDep = Annotated[aioredis.Redis, Depends(get_notice_redis)]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 402, 409, 429, 500, 502, 503, 504)
}


def _failure(exc: errors.RerankFailed) -> JSONResponse:
    status = FAILURE_STATUS.get(exc.kind, 502)
    headers = {"Retry-After": str(RATE_LIMITED_RETRY_AFTER_S)} if status == 429 else None
    body = {"error": {"type": exc.kind, "message": exc.message, "job": exc.job_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def _headers(ranking: rerank_service.Ranking) -> dict[str, str]:
    """The job the rerank ran as (to look up in /v1/jobs), and where its time went."""
    timing = ", ".join(f"{name};dur={ms:.1f}" for name, ms in ranking.timings_ms.items())
    return {JOB_HEADER: ranking.job_id, "Server-Timing": timing}


async def _run(
    body: rerank_service.RerankInput,
    scope: ScopeDep,
    settings: SettingsDep,
    notices: aioredis.Redis,
    source: str,
) -> rerank_service.Ranking | JSONResponse:
    try:
        return await rerank_service.rerank(
            body, scope=scope, redis_client=notices, settings=settings, source=source
        )
    except errors.RerankFailed as exc:
        return _failure(exc)


async def _jina(
    body: JinaRerankRequest,
    scope: ScopeDep,
    settings: SettingsDep,
    notices: NoticeRedisDep,
    request: Request,
) -> JSONResponse:
    request_input = rerank_service.RerankInput(
        query=body.query,
        documents=body.documents,
        model=body.model,
        top_n=body.top_n,
        return_documents=body.return_documents,
    )
    source = f"POST {request.url.path}"
    ranking = await _run(request_input, scope, settings, notices, source)
    if isinstance(ranking, JSONResponse):
        return ranking
    answer = {
        "model": ranking.model,
        "usage": {"total_tokens": ranking.total_tokens},
        "results": ranking.results,
    }
    return JSONResponse(answer, headers=_headers(ranking))


router.add_api_route(
    "/v1/rerank",
    _jina,
    methods=["POST"],
    response_model=JinaRerankResponse,
    responses=ERRORS,
    summary="Rerank documents (Jina's shape), through the workers",
    operation_id="rerank",
)
router.add_api_route(
    "/jina/v1/rerank",
    _jina,
    methods=["POST"],
    response_model=JinaRerankResponse,
    responses=ERRORS,
    summary="Rerank documents (Jina's shape), at Jina's own path",
    operation_id="jina_rerank",
)


@router.post(
    "/v2/rerank",
    response_model=CohereRerankResponse,
    responses=ERRORS,
    summary="Rerank documents (Cohere v2's shape), through the workers",
)
async def cohere_rerank(
    body: CohereRerankRequest,
    scope: ScopeDep,
    settings: SettingsDep,
    notices: NoticeRedisDep,
) -> JSONResponse:
    request_input = rerank_service.RerankInput(
        query=body.query, documents=list(body.documents), model=body.model, top_n=body.top_n
    )
    ranking = await _run(request_input, scope, settings, notices, "POST /v2/rerank")
    if isinstance(ranking, JSONResponse):
        return ranking
    answer = {
        "id": ranking.job_id,
        "results": [
            {"index": r["index"], "relevance_score": r["relevance_score"]} for r in ranking.results
        ],
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {
                "search_units": ranking.billed_calls,
                "input_tokens": ranking.total_tokens,
            },
            "tokens": {"input_tokens": ranking.total_tokens, "output_tokens": 0},
        },
    }
    return JSONResponse(answer, headers=_headers(ranking))
