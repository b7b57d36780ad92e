"""Tokens: every endpoint but /healthz and /openapi.json needs a valid one."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
from conftest import ApiServer
from sqlalchemy import text

from worker import tenants
from worker.db.session import get_engine
from worker.settings import get_settings

GUARDED = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
    ("POST", "/v1/jobs/0123456789abcdef0123456789abcdef/cancel"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/results"),
    ("GET", "/v1/usage"),
]


def test_health_and_openapi_answer_without_a_token(api_server: ApiServer) -> None:
    with api_server.client() as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "database": True, "redis": True}
        document = client.get("/openapi.json")
        assert document.status_code == 200
        assert "/v1/jobs" in document.json()["paths"]
        assert client.get("/docs").status_code == 200


BAD_AUTHORIZATIONS = [
    None,
    "Bearer rrw_nonsense",
    "Bearer rrw_abcdefgh_" + "x" * 43,
    "Bearer",
    "Basic dXNlcjpwYXNz",
]


def test_every_endpoint_refuses_a_missing_or_bad_token(api_server: ApiServer) -> None:
    for authorization in BAD_AUTHORIZATIONS:
        headers = {"Authorization": authorization} if authorization else {}
        with httpx.Client(base_url=api_server.base_url, headers=headers) as client:
            for method, path in GUARDED:
                answer = client.request(method, path)
                assert answer.status_code == 401, (authorization, method, path, answer.text)
                assert answer.json()["error"]["type"] == "unauthorized"
                assert answer.headers["www-authenticate"] == "Bearer"


def test_a_token_with_the_right_prefix_but_wrong_secret_is_refused(
    api_server: ApiServer,
) -> None:
    good = api_server.tokens["acme"]
    forged = good[:-4] + ("aaaa" if not good.endswith("aaaa") else "bbbb")
    answer = httpx.get(
        f"{api_server.base_url}/v1/jobs", headers={"Authorization": f"Bearer {forged}"}
    )
    assert answer.status_code == 401


def test_a_revoked_token_answers_401(api_server: ApiServer) -> None:
    with api_server.client("acme") as client:
        assert client.get("/v1/jobs").status_code == 200
        done = api_server.env.cli("tokens", "revoke", "acme")
        assert done.returncode == 0, done.stderr
        answer = client.get("/v1/jobs")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "unauthorized"


def test_tokens_are_stored_only_as_hashes(api_server: ApiServer) -> None:
    made = tenants.create_tenant("initech", get_settings())
    listed = api_server.env.cli("tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["name"] for r in rows} == {"admin", "acme", "globex", "initech"}
    assert [r["admin"] for r in rows if r["name"] == "admin"] == [True]
    assert made.token not in listed.stdout
    with get_engine(get_settings().sqlalchemy_url()).connect() as connection:
        stored = repr(connection.execute(text("SELECT * FROM tenant")).all())
    assert made.token not in stored
    assert hashlib.sha256(made.token.encode()).hexdigest() in stored


def test_tokens_create_prints_the_token_once_and_refuses_a_taken_name(
    api_server: ApiServer,
) -> None:
    env = api_server.env
    plain = env.cli("tokens", "create", "hooli")
    assert plain.returncode == 0, plain.stderr
    token = plain.stdout.strip().splitlines()[-1]
    assert token.startswith("rrw_") and len(token) == 4 + 8 + 1 + 43
    made = env.cli("tokens", "create", "pied-piper", "--admin", "--json")
    assert made.returncode == 0, made.stderr
    shown = json.loads(made.stdout)
    assert set(shown) == {"name", "token", "webhook_secret"}
    assert shown["webhook_secret"].startswith("whsec_")
    assert len(base64.b64decode(shown["webhook_secret"].removeprefix("whsec_"))) >= 24
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {shown['token']}"}
    ) as client:
        assert client.get("/v1/jobs").status_code == 200
    again = env.cli("tokens", "create", "hooli")
    assert again.returncode == 2
    assert "hooli" in again.stderr and "already exists" in again.stderr
    unknown = env.cli("tokens", "revoke", "nobody")
    assert unknown.returncode == 2
