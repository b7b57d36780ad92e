"""The dashboard and the API's /metrics, over HTTP against a real API process and workers.

(The browser's view of the same pages is tests/browser/test_dashboard_browser.py.)
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
from conftest import SECRETS, ApiServer
from jobs_support import make_requests
from prometheus_client.parser import text_string_to_metric_families

from worker.standin import ThreadedStandin

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def post_job(api: ApiServer, tenant: str, count: int) -> str:
    with api.client(tenant) as client:
        made = client.post("/v1/jobs", content=ndjson(make_requests(count)), headers=NDJSON)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


@contextlib.contextmanager
def signed_in(api: ApiServer, tenant: str) -> Iterator[httpx.Client]:
    """A browser-like client: it signs in through the form and then carries the cookie."""
    with httpx.Client(base_url=api.base_url, timeout=60) as client:
        answer = client.post("/signin", data={"token": api.tokens[tenant]})
        assert answer.status_code == 303, answer.text
        yield client


def test_the_sign_in_form_sets_an_httponly_samesite_cookie_and_refuses_a_bad_token(
    api_server: ApiServer,
) -> None:
    with httpx.Client(base_url=api_server.base_url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert re.search(r'<input[^>]*name="token"', page.text)
        assert "<form" in page.text and 'method="post"' in page.text

        refused = client.post("/signin", data={"token": "rrw_notvalid_x"})
        assert refused.status_code == 401 and "not valid" in refused.text
        assert "set-cookie" not in refused.headers

        token = api_server.tokens["acme"]
        answer = client.post("/signin", data={"token": token})
        assert answer.status_code == 303
        assert token not in answer.headers["location"]
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
        home = client.get("/")
        assert home.status_code == 200 and "acme" in home.text and "sign out" in home.text

        client.post("/signout")
        assert 'name="token"' in client.get("/").text
        assert client.get("/dashboard/keys").status_code == 401


def test_a_tenants_dashboard_never_shows_another_tenants_job_and_an_admins_shows_all(
    api_server: ApiServer,
) -> None:
    mine, theirs = post_job(api_server, "acme", 3), post_job(api_server, "globex", 3)
    with signed_in(api_server, "acme") as acme:
        home = acme.get("/").text
        assert mine in home and theirs not in home
        listed = [j["id"] for j in acme.get("/dashboard/api/jobs").json()["data"]]
        assert listed == [mine]
        assert acme.get(f"/dashboard/jobs/{theirs}").status_code == 404
        assert acme.get(f"/dashboard/api/jobs/{theirs}").status_code == 404
        assert acme.get(f"/dashboard/jobs/{theirs}/results.jsonl").status_code == 404
        assert acme.get(f"/dashboard/jobs/{mine}").status_code == 200
    with signed_in(api_server, "admin") as admin:
        home = admin.get("/").text
        assert mine in home and theirs in home


def test_job_keys_usage_pages_and_metrics_after_a_job_with_failures(
    api_server: ApiServer, standin: ThreadedStandin
) -> None:
    env = api_server.env
    env.values["RERANK_MAX_ATTEMPTS"] = "1"
    standin.update(fault_5xx=0.3, seed=5)
    env.start_worker()
    job_id = post_job(api_server, "acme", 30)
    with api_server.client("acme") as client:
        ended = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert ended["status"] == "completed" and ended["failed"] > 0, ended

    with signed_in(api_server, "acme") as acme:
        page = acme.get(f"/dashboard/jobs/{job_id}").text
        assert re.search(r"<td>upstream_unavailable</td><td>\d+</td>", page)
        assert f"{ended['succeeded'] + ended['failed']}/30" in page
        assert f"/dashboard/jobs/{job_id}/results.jsonl" in page
        download = acme.get(f"/dashboard/jobs/{job_id}/results.jsonl")
        assert download.status_code == 200 and len(download.text.splitlines()) == 30
        assert "attachment" in download.headers["content-disposition"]

        keys = acme.get("/dashboard/keys").text
        assert re.search(r'data-key="alpha">\s*<td>alpha</td>\s*<td class="slots">0/3</td>', keys)

        usage = acme.get("/dashboard/usage").text
        assert usage.count('<svg class="chart"') == 3
        assert 'class="bar"' in usage and "alpha" in usage and "jina-reranker-m0" in usage
        for text in (page, keys, usage):
            assert all(secret not in text for secret in SECRETS.values())

    assert httpx.get(f"{api_server.base_url}/metrics").status_code == 401
    with api_server.client("acme") as client:
        scraped = client.get("/metrics")
    assert scraped.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    assert samples[("rerank_key_slots_limit", (("key", "alpha"),))] == 3
    assert samples[("rerank_queue_depth", (("queue", "bulk"),))] == 0
    assert samples[("rerank_redis_up", ())] == 1
