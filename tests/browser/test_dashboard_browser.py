"""The dashboard in a real browser: Debian's chromium driven by Playwright.

Sign in through the form, watch a running job's progress advance (the page's own script
polls), open the job's page, see the usage charts drawn, and check that a tenant's dashboard
never shows another tenant's job. A screenshot is kept in the test's directory (and in
DASHBOARD_SCREENSHOT_DIR when set, for the README).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer
from jobs_support import make_requests
from playwright import sync_api as playwright_sync

from worker.standin import ThreadedStandin

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
def browser() -> Iterator[Any]:
    assert Path(CHROMIUM).exists(), (
        "no chromium: scripts/test.sh installs it (apt-get install chromium)"
    )
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


def post_job(api: ApiServer, tenant: str, count: int) -> str:
    body = "".join(json.dumps(r) + "\n" for r in make_requests(count)).encode()
    with api.client(tenant) as client:
        made = client.post("/v1/jobs", content=body, headers=NDJSON)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def sign_in(browser: Any, api: ApiServer, tenant: str) -> Any:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(api.base_url + "/")
    page.fill('input[name="token"]', api.tokens[tenant])
    page.click('button[type="submit"]')
    page.wait_for_selector("table.jobs")
    return page


def done_of(page: Any, job_id: str) -> int:
    text = page.locator(f'tr[data-job="{job_id}"] .done').inner_text()
    return int(text.split("/")[0])


def test_sign_in_watch_a_job_advance_open_it_and_see_the_charts(
    api_server: ApiServer, standin: ThreadedStandin, browser: Any, tmp_path: Path
) -> None:
    env = api_server.env
    standin.update(latency_ms=250)
    env.start_worker(concurrency=2)
    job_id = post_job(api_server, "acme", 60)
    theirs = post_job(api_server, "globex", 2)

    page = sign_in(browser, api_server, "acme")
    assert page.locator(f'tr[data-job="{job_id}"]').count() == 1
    assert page.locator(f'tr[data-job="{theirs}"]').count() == 0
    # The page is not reloaded: its script updates the row as the job runs.
    first = done_of(page, job_id)
    page.wait_for_function(
        "([id, seen]) => { const cell = document.querySelector(`tr[data-job='${id}'] .done`);"
        " return cell && parseInt(cell.textContent) > seen; }",
        arg=[job_id, first],
        timeout=60_000,
    )
    page.wait_for_function(
        "(id) => document.querySelector(`tr[data-job='${id}'] .status`).textContent"
        " === 'completed'",
        arg=job_id,
        timeout=90_000,
    )
    assert done_of(page, job_id) == 60

    page.click(f'a[href="/dashboard/jobs/{job_id}"]')
    page.wait_for_selector("section.job")
    assert page.locator("dd.succeeded").inner_text() == "60"
    assert page.locator("a.download").get_attribute("href") == (
        f"/dashboard/jobs/{job_id}/results.jsonl"
    )

    page.goto(api_server.base_url + "/dashboard/usage")
    charts = page.locator("svg.chart")
    assert charts.count() == 3
    assert page.locator("svg.chart rect.bar").count() >= 2  # tokens by key and by model
    box = charts.first.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100
    page.goto(api_server.base_url + "/dashboard/keys")
    assert page.locator('tr[data-key="alpha"] .slots').inner_text().endswith("/3")

    shots = []
    for path, name in (("/", "dashboard.png"), ("/dashboard/usage", "dashboard-usage.png")):
        page.goto(api_server.base_url + path)
        shots.append(tmp_path / name)
        page.screenshot(path=str(shots[-1]), full_page=True)
        assert shots[-1].stat().st_size > 10_000
    if target := os.environ.get("DASHBOARD_SCREENSHOT_DIR"):
        for shot in shots:
            shutil.copy(shot, Path(target) / shot.name)

    # The other tenant's browser sees its own job only, and not acme's even by its URL.
    other = sign_in(browser, api_server, "globex")
    assert other.locator(f'tr[data-job="{theirs}"]').count() == 1
    assert other.locator(f'tr[data-job="{job_id}"]').count() == 0
    answer = other.goto(api_server.base_url + f"/dashboard/jobs/{job_id}")
    assert answer is not None and answer.status == 404
    cookies = other.context.cookies()
    session = next(c for c in cookies if c["name"] == "rerank_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert httpx.get(api_server.base_url + "/dashboard/api/jobs").status_code == 401
