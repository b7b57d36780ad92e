"""Hostile input on real databases and through the real CLI: what PostgreSQL (or SQLite, or
a codec on the way there) would refuse is refused as bad input, the same on both, with
nothing stored; what Windows writes is accepted and runs end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Env
from fuzz_strategies import row_counts
from jobs_support import expected_results, results_of, submit, wait_ok
from sqlalchemy import text

from worker import errors, ingest
from worker.db import repository
from worker.db.models import RequestStatus
from worker.db.session import get_engine
from worker.service.scope import sessions
from worker.service.submit import JobOptions, submit_job
from worker.settings import get_settings

GOOD = b'{"custom_id": "ok", "query": "q", "documents": ["a"]}\n'

# Each of these ended in a traceback (exit 1) on PostgreSQL, on SQLite, or on both, before
# they were validated; the expected error names the line and field.
HOSTILE_LINES = {
    "nested 5,000 deep (RecursionError in json)": (
        b'{"query": "q", "documents": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        None,
        "nested deeper than the cap of 32 levels",
    ),
    "NUL in the query (PostgreSQL text cannot hold it)": (
        b'{"query": "a\\u0000b", "documents": ["a"]}',
        "query",
        "NUL character",
    ),
    "lone surrogate in a document (UTF-8 cannot encode it)": (
        b'{"query": "q", "documents": ["\\ud800"]}',
        "documents[0]",
        "lone surrogate",
    ),
    "top_n 10**30 (INTEGER on PostgreSQL, int64 on SQLite)": (
        b'{"query": "q", "documents": ["a"], "top_n": 1000000000000000000000000000000}',
        "top_n",
        "over the cap of 2,147,483,647",
    ),
    "top_n 2**40 (INTEGER on PostgreSQL only)": (
        b'{"query": "q", "documents": ["a"], "top_n": 1099511627776}',
        "top_n",
        "over the cap of 2,147,483,647",
    ),
    "an integer of 5,000 digits (ValueError in json)": (
        b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}",
        None,
        "a number of more than 4,300 digits",
    ),
    "a model name over VARCHAR(100) (PostgreSQL only)": (
        b'{"query": "q", "documents": ["a"], "model": "' + b"m" * 150 + b'"}',
        "model",
        "150 characters, over the cap of 100",
    ),
}


def _submit(lines: bytes, **options: Any) -> str:
    settings = get_settings()
    stream = ingest.read_lines(io.BytesIO(lines), settings.max_line_bytes)
    return submit_job(
        stream, source="test", options=JobOptions(**options), settings=settings
    ).job_id


def test_every_hostile_kind_is_refused_by_submit_on_both_databases_storing_nothing(
    make_env: Any, database_url: str
) -> None:
    make_env(database_url)
    before = row_counts(database_url)
    for kind, (line, field, reason) in HOSTILE_LINES.items():
        with pytest.raises(errors.InputError) as caught:
            _submit(GOOD + line + b"\n")
        assert (caught.value.line, caught.value.field) == (2, field), kind
        assert reason in caught.value.reason, kind
        assert row_counts(database_url) == before, kind


def test_a_corpus_id_over_its_column_is_refused_on_both_databases(
    make_env: Any, database_url: str
) -> None:
    make_env(database_url)
    with pytest.raises(errors.InputError) as caught:
        _submit(b'"a"\n{"id": "' + b"i" * 300 + b'", "text": "t"}\n', query="q")
    assert (caught.value.line, caught.value.field) == (2, "id")
    assert row_counts(database_url) == {"job": 0, "request": 0, "document": 0}


def test_a_nul_in_a_document_is_stored_as_given_on_both_databases(
    make_env: Any, database_url: str
) -> None:
    """A document is kept as JSON text, so its NUL is the escape \\u0000, which any
    database stores: refusing it would refuse text extracted from PDFs for no gain."""
    make_env(database_url)
    job_id = _submit(b'{"query": "q", "documents": ["a\\u0000b", {"text": "\\u0000"}]}\n')
    with get_engine(database_url).connect() as connection:
        contents = connection.execute(
            text(
                "SELECT content FROM document JOIN request ON request.id = document.request_id "
                "WHERE request.job_id = :job ORDER BY document.position"
            ),
            {"job": job_id},
        ).scalars()
        assert [json.loads(c) for c in contents] == ["a\x00b", {"text": "\x00"}]


def test_a_file_name_that_is_not_utf8_is_stored_with_its_bytes_escaped(
    make_env: Any, database_url: str
) -> None:
    """Python decodes such a name with lone surrogates, which neither database takes."""
    make_env(database_url)
    settings = get_settings()
    result = submit_job([GOOD], source="/data/caf\udce9.jsonl", settings=settings)
    with get_engine(database_url).connect() as connection:
        source = connection.execute(
            text("SELECT source FROM job WHERE id = :id"), {"id": result.job_id}
        ).scalar_one()
    assert source == "/data/caf\\udce9.jsonl"


def test_a_value_the_database_refuses_becomes_bad_input_at_the_repository_edge(
    make_env: Any, database_url: str
) -> None:
    """The backstop behind validation: a row that skipped it is still answered as bad input
    naming the table (and, on PostgreSQL, the column), not a driver's traceback."""
    make_env(database_url)
    row = {
        "job_id": "j",
        "position": 0,
        "custom_id": "c",
        "query": "q",
        "model": "m",
        "top_n": 10**30,
        "return_documents": False,
        "document_count": 1,
        "status": RequestStatus.QUEUED,
        "deliveries": 0,
        "total_tokens": 0,
    }
    maker = sessions(get_settings())
    for refused, column in ((row, "top_n"), ({**row, "top_n": 1, "query": "\ud800"}, None)):
        with maker() as session, pytest.raises(errors.InputError) as caught:
            repository.insert_requests(session, [refused])
        assert "the database refused a value for request" in str(caught.value)
        if column and database_url.startswith("postgresql"):
            assert caught.value.field == column


@pytest.mark.parametrize("kind", list(HOSTILE_LINES)[:4])
def test_cli_exits_2_without_a_traceback_for_hostile_lines(
    make_env: Any, postgres_url: str, tmp_path: Path, kind: str
) -> None:
    env: Env = make_env(postgres_url)
    line, field, reason = HOSTILE_LINES[kind]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(GOOD + line + b"\n")
    done = env.cli("submit", str(path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "line 2" in done.stderr and reason in done.stderr
    if field:
        assert f"field '{field}'" in done.stderr
    assert row_counts(postgres_url) == {"job": 0, "request": 0, "document": 0}


def test_cli_refuses_hostile_options_with_exit_2(
    make_env: Any, postgres_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(postgres_url)
    path = tmp_path / "ok.jsonl"
    path.write_bytes(GOOD)
    for args, field in (
        (["--top-n", str(10**30)], "top_n"),
        (["--idempotency-key", "k" * 300], "idempotency_key"),
        (["--model", "m" * 150], "model"),
    ):
        done = env.cli("submit", str(path), *args)
        assert done.returncode == 2, done.stderr
        assert f"field '{field}'" in done.stderr and "Traceback" not in done.stderr
    assert row_counts(postgres_url) == {"job": 0, "request": 0, "document": 0}


def test_files_written_on_windows_run_end_to_end(
    make_env: Any, database_url: str, tmp_path: Path
) -> None:
    """A requests file with a UTF-8 byte-order mark and CRLF line ends, and a CRLF corpus
    file: stored, run by a worker, and their results the same as for Unix files."""
    env: Env = make_env(database_url)
    requests = [
        {"custom_id": "w-1", "query": "boots", "documents": ["rain boots", "sun hat", "ünï"]},
        {"custom_id": "w-2", "query": "hat", "documents": [{"text": "straw hat"}, "boots"]},
    ]
    with_bom = tmp_path / "windows.jsonl"
    with_bom.write_bytes(
        b"\xef\xbb\xbf"
        + b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n" for r in requests)
        + b"\r\n"
    )
    corpus = ["rain boots", {"text": "sun hat", "id": "d-1"}]
    crlf_corpus = tmp_path / "corpus.jsonl"
    crlf_corpus.write_bytes(b"".join(json.dumps(d).encode() + b"\r\n" for d in corpus))
    env.start_worker(concurrency=2)
    job_id = submit(env, with_bom)
    corpus_job = submit(env, crlf_corpus, "--query", "boots")
    wait_ok(env, job_id)
    wait_ok(env, corpus_job)
    lines = results_of(env, job_id)
    assert [line["custom_id"] for line in lines] == ["w-1", "w-2"]
    assert all(line["status"] == "succeeded" for line in lines)
    for line, request in zip(lines, requests, strict=True):
        assert [r["index"] for r in line["results"]] == [
            r["index"] for r in expected_results(request)
        ]
    (corpus_line,) = results_of(env, corpus_job)
    assert corpus_line["status"] == "succeeded"
    assert sorted(r["index"] for r in corpus_line["results"]) == [0, 1]
