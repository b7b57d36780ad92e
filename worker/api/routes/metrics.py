"""`GET /metrics`: the API's Prometheus metrics (its own registry) and the Redis state.

The API holds no key, so the key gauges name the keys the workers published. The upstream
counters are the workers' (`rerank-worker worker --metrics-port`); scrape those too.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from worker import broker
from worker.api import schemas
from worker.api.deps import CallerDep, SettingsDep
from worker.metrics import RedisStateCollector
from worker.redis_clients import redis_url, sync_redis

router = APIRouter(tags=["metrics"])


def _registry(request: Request, settings: SettingsDep) -> CollectorRegistry:
    """One registry per app, made at the first scrape."""
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        depths = functools.partial(broker.queue_depths, settings)
        registry.register(RedisStateCollector(sync_redis(redis_url(settings)), depths))
        request.app.state.metrics_registry = registry
    return registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        401: {"model": schemas.ErrorResponse, "description": "No valid token"},
    },
)
async def metrics(request: Request, settings: SettingsDep, _caller: CallerDep) -> Response:
    """Prometheus metrics, with a valid token (any tenant's: they name keys, not jobs)."""
    body = await run_in_threadpool(generate_latest, _registry(request, settings))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
