"""Jobs over HTTP, against a real API process, real workers and the stand-in."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ApiServer, wait_for
from jobs_support import assert_no_secret, expected_results, make_requests, write_jsonl
from sqlalchemy import func, select, text

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
    assert_no_secret(made.text, waited.text, answer.text, json.dumps(usage), api_server.log())


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
def test_a_large_corpus_streams_in_and_results_stream_out(api_server: ApiServer) -> None:
    documents = 200_000

    def body() -> Iterator[bytes]:
        for start in range(0, documents, 10_000):
            yield "".join(
                json.dumps({"text": f"document {i} of the corpus, word {i * 7919 % 10007}"}) + "\n"
                for i in range(start, start + 10_000)
            ).encode()

    many = [
        {"custom_id": f"m-{i}", "query": f"q {i}", "documents": [f"d {i}"]} for i in range(20_000)
    ]
    with api_server.client("acme") as client:
        made = client.post(
            "/v1/jobs", content=body(), headers=NDJSON, params={"query": "word 17", "top_n": 5}
        )
        assert made.status_code == 201, made.text
        assert made.json()["total_requests"] == 1
        assert row_counts() == (1, 1, documents)
        big = client.post("/v1/jobs", content=ndjson(many), headers=NDJSON).json()
        with client.stream("GET", f"/v1/jobs/{big['id']}/results") as answer:
            assert answer.status_code == 200
            assert "content-length" not in answer.headers
            assert answer.headers["transfer-encoding"] == "chunked"
            pieces = list(answer.iter_raw())
    streamed = b"".join(pieces)
    assert len(pieces) > 1
    assert streamed.count(b"\n") == len(many)
    cli = api_server.env.cli("results", big["id"])
    assert streamed == cli.stdout.encode()
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


def test_a_body_cut_short_by_the_client_stores_nothing(api_server: ApiServer) -> None:
    host, port = api_server.base_url.removeprefix("http://").split(":")
    lines = ndjson(make_requests(50))
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: api\r\n"
        f"Authorization: Bearer {api_server.tokens['acme']}\r\n"
        f"Content-Type: application/x-ndjson\r\nContent-Length: {len(lines) * 10}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + lines)
    wait_for(lambda: "action=upload_incomplete" in api_server.log(), 30, "the API to see the cut")
    assert row_counts() == (0, 0, 0)
    with api_server.client("acme") as client:
        assert client.get("/v1/jobs").json() == {"data": []}


def test_several_api_processes_serve_one_database(
    api_server: ApiServer, start_api: Callable[..., ApiServer]
) -> None:
    second = start_api(api_server.env, workers=2, drop=("RERANK_API_KEYS",))
    second.tokens = api_server.tokens
    with api_server.client("acme") as one, second.client("acme") as other:
        made = one.post("/v1/jobs", content=ndjson(make_requests(2)), headers=NDJSON).json()
        for _ in range(6):
            assert other.get(f"/v1/jobs/{made['id']}").json()["id"] == made["id"]
    # The first worker process to start answers the requests; the other may start later.
    wait_for(
        lambda: second.log().count("Started server process") == 2,
        30,
        "both API worker processes to start",
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_one_key_sent_twice_at_once_makes_one_job(api_server: ApiServer) -> None:
    """The second submit waits on the first's row for the key, then answers its job.

    The test holds the first submit between its job row and its requests: it locks the
    request table, so the first's insert of requests waits while its job row is uncommitted.
    """
    body = ndjson(make_requests(4))
    answers: dict[str, httpx.Response] = {}
    headers = {**NDJSON, "Idempotency-Key": "at-once"}

    def post(name: str) -> None:
        with api_server.client("acme") as client:
            answers[name] = client.post("/v1/jobs", content=body, headers=headers)

    with get_sessionmaker(get_settings().sqlalchemy_url()).begin() as holder:
        holder.execute(text("LOCK TABLE request IN EXCLUSIVE MODE"))
        first = threading.Thread(target=post, args=("first",))
        first.start()
        wait_for(lambda: _sessions("wait_event_type = 'Lock'") == 1, 30, "the first to wait")
        second = threading.Thread(target=post, args=("second",))
        second.start()
        wait_for(lambda: _sessions("wait_event_type = 'Lock'") == 2, 30, "the second to wait")
    first.join(60)
    second.join(60)
    assert answers["first"].status_code == 201, answers["first"].text
    assert answers["second"].status_code == 200, answers["second"].text
    assert answers["second"].json()["id"] == answers["first"].json()["id"]
    assert row_counts()[:2] == (1, 4)


def _sessions(where: str) -> int:
    """PostgreSQL sessions on the test's database in that state."""
    query = f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {where}"
    with get_sessionmaker(get_settings().sqlalchemy_url())() as session:
        return int(session.scalar(text(query)) or 0)


def test_a_large_body_refused_for_a_parameter_still_gets_its_answer(
    api_server: ApiServer,
) -> None:
    """Refused before its first line was read: the server reads and drops the rest, or the
    client, still sending, would see a connection reset instead of its 400."""
    line = json.dumps({"query": "q", "documents": ["x" * 1000] * 30}).encode() + b"\n"
    body = line * 1000  # 30 MB: more than the socket buffers hold before the answer
    with api_server.client("acme") as client:
        for params, headers in [
            ({"top_n": "0"}, NDJSON),
            ({"priority": "bulk", "query": " "}, NDJSON),
            ({}, {"Content-Type": "text/csv"}),
        ]:
            answer = client.post("/v1/jobs", content=body, params=params, headers=headers)
            assert answer.status_code in (400, 415), answer.text
    assert row_counts() == (0, 0, 0)


def test_retry_over_http_runs_the_requests_a_budget_stopped_under_the_same_job(
    api_server: ApiServer,
) -> None:
    api_server.env.start_worker()
    requests = make_requests(12)
    with api_server.client("acme") as client:
        job = client.post(
            "/v1/jobs", params={"max_tokens": 1}, content=ndjson(requests), headers=NDJSON
        ).json()
        ended = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert ended["status"] == "completed" and ended["failed"] > 0, ended

        retried = client.post(f"/v1/jobs/{job['id']}/retry", params={"max_tokens": 10**9})
        assert retried.status_code == 200, retried.text
        assert retried.json()["id"] == job["id"]
        again = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert (again["status"], again["succeeded"], again["failed"]) == ("completed", 12, 0)
        lines = [
            json.loads(x) for x in client.get(f"/v1/jobs/{job['id']}/results").text.splitlines()
        ]
        for line, request in zip(lines, requests, strict=True):
            assert line["results"] == expected_results(request)

    with api_server.client("globex") as stranger:
        assert stranger.post(f"/v1/jobs/{job['id']}/retry").status_code == 404
