"""Jobs over HTTP, against a real API process, real workers and the stand-in."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import ApiServer
from jobs_support import expected_results, make_requests, write_jsonl
from sqlalchemy import func, select

from worker.db.models import Document, Job, Request
from worker.db.session import get_sessionmaker
from worker.settings import get_settings

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(rows: list[object]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def row_counts() -> tuple[int, int, int]:
    with get_sessionmaker(get_settings().sqlalchemy_url())() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Job, Request, Document)
        )


def test_a_job_posted_over_http_runs_and_its_results_match_the_cli(
    api_server: ApiServer, tmp_path: Path
) -> None:
    env = api_server.env
    env.start_worker()
    requests = make_requests(30, big_at=4)
    with api_server.client("acme") as client:
        made = client.post("/v1/jobs", content=ndjson(requests), headers=NDJSON)
        assert made.status_code == 201, made.text
        job = made.json()
        assert made.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] in ("queued", "running") and job["total"] == 30

        started = time.monotonic()
        waited = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60})
        assert waited.status_code == 200
        assert waited.json()["status"] == "completed", waited.text
        assert time.monotonic() - started < 55
        assert waited.json()["succeeded"] == 30

        answer = client.get(f"/v1/jobs/{job['id']}/results")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
        for line, request in zip(lines, requests, strict=True):
            assert line["results"] == expected_results(request)

        listed = client.get("/v1/jobs").json()["data"]
        assert [j["id"] for j in listed] == [job["id"]]
        usage = client.get("/v1/usage").json()
        assert usage["total_tokens"] > 0
        assert client.get("/v1/usage", params={"job": job["id"]}).json() == {
            **usage,
            "job": job["id"],
        }

    cli = env.cli("results", job["id"])
    assert cli.returncode == 0, cli.stderr
    assert answer.content == cli.stdout.encode()
    status = env.cli("status", job["id"], "--json")
    assert json.loads(status.stdout) == waited.json()
    tenant_usage = env.cli("usage", "--tenant", "acme", "--json")
    assert json.loads(tenant_usage.stdout)["total_tokens"] == usage["total_tokens"]
    assert env.cli("usage", "--tenant", "nobody").returncode == 2


def test_jobs_are_scoped_to_their_tenant_and_admins_see_all(
    api_server: ApiServer, tmp_path: Path
) -> None:
    env = api_server.env
    cli_job = env.cli("submit", str(write_jsonl(tmp_path / "cli.jsonl", make_requests(2))))
    assert cli_job.returncode == 0, cli_job.stderr
    cli_job_id = cli_job.stdout.strip().splitlines()[-1]
    with api_server.client("acme") as acme, api_server.client("globex") as globex:
        mine = acme.post("/v1/jobs", content=ndjson(make_requests(3)), headers=NDJSON).json()
        theirs = globex.post("/v1/jobs", content=ndjson(make_requests(4)), headers=NDJSON)
        assert theirs.status_code == 201
        for job_id in (mine["id"], cli_job_id):
            for method, path in [
                ("GET", f"/v1/jobs/{job_id}"),
                ("GET", f"/v1/jobs/{job_id}/results"),
                ("POST", f"/v1/jobs/{job_id}/cancel"),
                ("GET", f"/v1/usage?job={job_id}"),
            ]:
                answer = globex.request(method, path)
                assert answer.status_code == 404, (method, path, answer.text)
                assert answer.json()["error"]["type"] == "not_found"
        assert [j["id"] for j in globex.get("/v1/jobs").json()["data"]] == [theirs.json()["id"]]
        assert [j["id"] for j in acme.get("/v1/jobs").json()["data"]] == [mine["id"]]
        assert acme.get(f"/v1/jobs/{mine['id']}").json()["status"] == "queued"
    with api_server.client("admin") as admin:
        seen = {j["id"] for j in admin.get("/v1/jobs").json()["data"]}
        assert seen == {mine["id"], theirs.json()["id"], cli_job_id}
        assert admin.get(f"/v1/jobs/{cli_job_id}").status_code == 200
        cancelled = admin.post(f"/v1/jobs/{mine['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert (
            admin.get("/v1/jobs", params={"status": "cancelled"}).json()["data"][0]["id"]
            == (mine["id"])
        )


def test_a_repeated_idempotency_key_answers_the_same_job_per_tenant(
    api_server: ApiServer,
) -> None:
    body = ndjson(make_requests(3))
    key = {**NDJSON, "Idempotency-Key": "order-42"}
    with api_server.client("acme") as acme, api_server.client("globex") as globex:
        first = acme.post("/v1/jobs", content=body, headers=key)
        again = acme.post("/v1/jobs", content=body, headers=key)
        other = globex.post("/v1/jobs", content=body, headers=key)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert other.json()["id"] != first.json()["id"]
    assert row_counts()[:2] == (2, 6)


def test_a_json_body_and_a_corpus_with_a_query_are_jobs_too(api_server: ApiServer) -> None:
    requests = make_requests(3)
    with api_server.client("acme") as client:
        made = client.post("/v1/jobs", json={"requests": requests}, params={"top_n": 2})
        assert made.status_code == 201, made.text
        assert made.json()["total"] == 3
        corpus = client.post(
            "/v1/jobs",
            content=b'"a"\n{"text": "b", "id": 7}\n\n"c"\n',
            headers=NDJSON,
            params={"query": "letters", "priority": "interactive", "cache": "false"},
        )
        assert corpus.status_code == 201, corpus.text
        assert corpus.json()["priority"] == "interactive"
        as_json = client.post(
            "/v1/jobs", json={"documents": ["x", {"text": "y"}]}, params={"query": "q"}
        )
        assert as_json.status_code == 201, as_json.text
    assert row_counts() == (3, 3 + 1 + 1, sum(len(r["documents"]) for r in requests) + 3 + 2)


BAD_BODIES = [
    # (query parameters, content type, body, status, line, field)
    ({}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\n{"query": "q"}\n', 400, 2, "documents"),
    ({}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\nnot json\n', 400, 2, None),
    ({}, "application/x-ndjson", b'{"query": "q", "documents": ["a"], "x": 1}\n', 400, 1, "x"),
    ({}, "application/x-ndjson", b"", 400, None, None),
    ({}, "application/x-ndjson", b'{"query": "q", "documents": ["\xff"]}\n', 400, 1, None),
    ({"query": "q"}, "application/x-ndjson", b'"a"\n{"text": ""}\n', 400, 2, "text"),
    ({}, "application/json", b'{"requests": [{"query": "q", "documents": []}]}', 400, 1, "documents"),
    ({}, "application/json", b'{"requests": {}}', 400, None, "requests"),
    ({}, "application/json", b"[1, 2", 400, None, None),
    ({"top_n": "0"}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\n', 400, None, "top_n"),
    ({"priority": "urgent"}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\n', 400, None, "priority"),
    ({"max_cost": "-1"}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\n', 400, None, "max_cost"),
    ({"query": " "}, "application/x-ndjson", b'"a"\n', 400, None, "query"),
    ({"colour": "red"}, "application/x-ndjson", b'{"query": "q", "documents": ["a"]}\n', 400, None, "colour"),
    ({}, "text/csv", b"a,b\n", 415, None, None),
]  # fmt: skip


def test_each_bad_input_answers_its_line_and_field_and_stores_nothing(
    api_server: ApiServer,
) -> None:
    with api_server.client("acme") as client:
        for params, content_type, body, status, line, field in BAD_BODIES:
            answer = client.post(
                "/v1/jobs", params=params, content=body, headers={"Content-Type": content_type}
            )
            assert answer.status_code == status, (params, body, answer.text)
            error = answer.json()["error"]
            assert error["type"] == (
                "invalid_request" if status == 400 else "unsupported_media_type"
            )
            assert error["message"]
            if status == 400:
                assert (error["line"], error["field"]) == (line, field), (body, error)
    assert row_counts() == (0, 0, 0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_large_corpus_streams_in_and_its_results_stream_out(api_server: ApiServer) -> None:
    documents = 200_000

    def body() -> object:
        for start in range(0, documents, 10_000):
            yield "".join(
                json.dumps({"text": f"document {i} of the corpus, word {i * 7919 % 10007}"}) + "\n"
                for i in range(start, start + 10_000)
            ).encode()

    with api_server.client("acme") as client:
        made = client.post(
            "/v1/jobs", content=body(), headers=NDJSON, params={"query": "word 17", "top_n": 5}
        )
        assert made.status_code == 201, made.text
        assert made.json()["total_requests"] == 1
        with client.stream("GET", f"/v1/jobs/{made.json()['id']}/results") as answer:
            assert answer.status_code == 200
            streamed = b"".join(answer.iter_bytes())
    assert row_counts() == (1, 1, documents)
    (line,) = streamed.splitlines()
    assert json.loads(line)["custom_id"] == "corpus"
    peak_kb = _peak_rss_kb(api_server.process.pid)
    assert peak_kb < 300 * 1024, f"API peak RSS {peak_kb} kB"


def _peak_rss_kb(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1])
    raise AssertionError("no VmHWM")


def test_wait_holds_the_answer_until_the_job_ends_or_the_time_is_up(
    api_server: ApiServer,
) -> None:
    with api_server.client("acme") as client:
        job = client.post("/v1/jobs", content=ndjson(make_requests(5)), headers=NDJSON).json()
        started = time.monotonic()
        held = client.get(f"/v1/jobs/{job['id']}", params={"wait": 1.5})
        assert held.json()["status"] == "queued"
        assert 1.4 <= time.monotonic() - started < 10
        assert client.get(f"/v1/jobs/{job['id']}", params={"wait": 61}).status_code == 400
        api_server.env.start_worker()
        started = time.monotonic()
        ended = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60})
    assert ended.json()["status"] == "completed"
    assert time.monotonic() - started < 50
