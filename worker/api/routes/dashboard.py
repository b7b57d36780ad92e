"""The dashboard at `/`: sign in with a token, then jobs, a job, keys and usage, as HTML.

Server-rendered pages (Jinja2 templates and SVG charts drawn here) with one small script
that polls the JSON endpoints for live progress; nothing is fetched from another host. The
token goes in an HttpOnly, SameSite=Lax cookie, never in a URL. Tenants see their own jobs,
admins every job, exactly as through the API (the same scope). Every page reads aggregates.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from worker import errors, tenants
from worker.api import charts
from worker.api.deps import SettingsDep
from worker.service import overview, read

router = APIRouter(include_in_schema=False)

COOKIE = "rerank_session"
COOKIE_MAX_AGE_S = 12 * 3600
POLL_MS = 1500
_templates = Jinja2Templates(directory=str(resources.files("worker.api") / "templates"))


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return request.cookies.get(COOKIE)


def get_viewer(request: Request, settings: SettingsDep) -> tenants.Caller | None:
    """The signed-in tenant (the cookie's token, or a Bearer header), or None."""
    token = _token(request)
    return tenants.verify_token(token, settings) if token else None


ViewerDep = Annotated[tenants.Caller | None, Depends(get_viewer)]


def _page(
    request: Request, name: str, viewer: tenants.Caller | None, status: int = 200, **context: Any
) -> HTMLResponse:
    return _templates.TemplateResponse(
        request,
        name,
        {"viewer": viewer, "poll_ms": POLL_MS, **context},
        status_code=status,
    )


def _signin(request: Request, message: str | None = None, status: int = 401) -> HTMLResponse:
    return _page(request, "signin.html", None, status=status, message=message)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, viewer: ViewerDep, settings: SettingsDep) -> Response:
    if viewer is None:
        return _signin(request, status=200)
    jobs = overview.jobs(viewer.scope, settings)
    return _page(request, "jobs.html", viewer, jobs=jobs)


@router.post("/signin")
async def signin(request: Request, settings: SettingsDep) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    caller = await run_in_threadpool(tenants.verify_token, token, settings) if token else None
    if caller is None:
        return _signin(request, "That token is not valid (unknown or revoked).")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/signout")
def signout() -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/dashboard/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, viewer: ViewerDep, settings: SettingsDep) -> Response:
    if viewer is None:
        return _signin(request)
    try:
        detail = overview.job_detail(job_id, viewer.scope, settings)
    except errors.JobNotFound:
        return _page(request, "missing.html", viewer, status=404, job_id=job_id)
    return _page(request, "job.html", viewer, **detail)


@router.get("/dashboard/jobs/{job_id}/results.jsonl")
def job_results(
    request: Request, job_id: str, viewer: ViewerDep, settings: SettingsDep
) -> Response:
    if viewer is None:
        return _signin(request)
    try:
        chunks = read.iter_result_chunks(job_id, settings, viewer.scope)
    except errors.JobNotFound:
        return _page(request, "missing.html", viewer, status=404, job_id=job_id)
    return StreamingResponse(
        chunks,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.jsonl"'},
    )


@router.get("/dashboard/keys", response_class=HTMLResponse)
def keys_page(request: Request, viewer: ViewerDep, settings: SettingsDep) -> Response:
    if viewer is None:
        return _signin(request)
    view = overview.keys_view(settings)
    return _page(request, "keys.html", viewer, keys=view.keys, queues=view.queues)


def _days(count: int) -> list[str]:
    """The last `count` UTC days, oldest first, as the rows spell them (YYYY-MM-DD)."""
    today = dt.datetime.now(dt.UTC).date()
    return [(today - dt.timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]


def _series(rows: list[Any], by: str, value: str) -> dict[str, dict[str, float]]:
    series: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        amount = getattr(row, value)
        if amount:
            series[getattr(row, by)][row.day] += amount
    return series


@router.get("/dashboard/usage", response_class=HTMLResponse)
def usage_page(request: Request, viewer: ViewerDep, settings: SettingsDep) -> Response:
    if viewer is None:
        return _signin(request)
    rows = overview.usage_by_day(viewer.scope, settings)
    chart = charts.stacked_bars
    days = _days(overview.USAGE_DAYS)
    by_key = _series(rows, "key_name", "tokens")
    by_model = _series(rows, "model", "tokens")
    cost_by_model = _series(rows, "model", "cost")
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for row in rows:
        entry = totals[(row.key_name, row.model)]
        entry[0] += row.calls
        entry[1] += row.tokens
        entry[2] += row.cost or 0.0
    return _page(
        request,
        "usage.html",
        viewer,
        days=overview.USAGE_DAYS,
        tokens_by_key=Markup(chart(days, by_key, label="tokens per day by key")),
        tokens_by_model=Markup(chart(days, by_model, label="tokens per day by model")),
        cost_by_model=Markup(chart(days, cost_by_model, label="cost per day by model")),
        totals=sorted(totals.items()),
    )


@router.get("/dashboard/api/jobs")
def jobs_json(viewer: ViewerDep, settings: SettingsDep) -> Response:
    """The jobs page's poll: each job's status and counts."""
    if viewer is None:
        return JSONResponse({"error": {"type": "unauthorized", "message": "sign in"}}, 401)
    return JSONResponse({"data": [j.as_dict() for j in overview.jobs(viewer.scope, settings)]})


@router.get("/dashboard/api/jobs/{job_id}")
def job_json(job_id: str, viewer: ViewerDep, settings: SettingsDep) -> Response:
    if viewer is None:
        return JSONResponse({"error": {"type": "unauthorized", "message": "sign in"}}, 401)
    try:
        detail = overview.job_detail(job_id, viewer.scope, settings)
    except errors.JobNotFound:
        return JSONResponse({"error": {"type": "not_found", "message": "no such job"}}, 404)
    return JSONResponse({**detail["job"].as_dict(), "failures": detail["failures"]})
