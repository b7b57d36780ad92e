"""The app factory: settings, error handlers and routers; nothing else lives here."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from worker.api import errors
from worker.api.routes import dashboard, health, jobs, metrics, rerank
from worker.settings import Settings, get_settings

DESCRIPTION = """Hand rerank jobs to rerank-worker over HTTP, read their results and usage.

Every endpoint but `/healthz` and `/openapi.json` needs `Authorization: Bearer TOKEN`, a
token from `rerank-worker tokens create NAME`. A job belongs to the tenant that submitted it.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API on these settings (by default the RERANK_* environment's). It holds no
    upstream key: only workers call the upstream."""
    app = FastAPI(
        title="rerank-worker",
        description=DESCRIPTION,
        version="1",
        separate_input_output_schemas=False,
    )
    app.state.settings = settings or get_settings()
    errors.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(rerank.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    static = StaticFiles(directory=str(resources.files("worker.api") / "static"))
    app.mount("/dashboard/static", static, name="dashboard-static")
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the 422 it lists everywhere taken out: a bad parameter
    answers 400 here (errors.py), and the routes document that."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            separate_input_output_schemas=app.separate_input_output_schemas,
        )
        for path in document["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = document
    return app.openapi_schema
