"""Hostile lines, one kind per test: each is refused by the validator, before any database
sees it, naming the line, the field and (for sizes) the cap; or, for what Windows and JSON
writers produce, accepted as the same content."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from worker import constants, errors
from worker.ingest import Limits, iter_corpus, iter_requests, read_lines, shown

MODEL = "jina-reranker-m0"
GOOD = '{"custom_id": "ok", "query": "q", "documents": ["a"]}'


def request_error(*lines: bytes | str, limits: Limits | None = None) -> errors.InputError:
    with pytest.raises(errors.InputError) as caught:
        list(iter_requests(list(lines), default_model=MODEL, limits=limits or Limits()))
    return caught.value


def corpus_error(*lines: bytes | str) -> errors.InputError:
    with pytest.raises(errors.InputError) as caught:
        list(iter_corpus(list(lines)))
    return caught.value


def with_fields(**fields: Any) -> str:
    return json.dumps({"query": "q", "documents": ["a"], **fields})


# --- nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 990, 5000, 100_000])
def test_nesting_past_the_cap_is_refused_the_same_at_any_depth(depth: int) -> None:
    """Past the cap the error is the same, whether the parser could read the line (33) or
    would run out of stack (5000): it does not depend on how deep the caller's stack is."""
    deep = '{"query": "q", "documents": ' + "[" * depth + "]" * depth + "}"
    error = request_error(GOOD, deep)
    assert (error.line, error.field) == (2, None)
    assert f"nested deeper than the cap of {constants.MAX_JSON_DEPTH} levels" in str(error)


def test_nesting_past_the_cap_in_a_corpus_line_is_refused() -> None:
    error = corpus_error('"a"', "[" * 5000 + "]" * 5000)
    assert error.line == 2
    assert "nested deeper than the cap" in str(error)


def test_a_line_nested_within_the_cap_gets_the_fields_own_error() -> None:
    error = request_error(with_fields(top_n=[[[1]]]))
    assert error.field == "top_n"
    assert "nested" not in str(error)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    error = request_error(with_fields(top_n=0, custom_id="[" * 100))
    assert (error.field, error.reason) == ("top_n", "must be a positive integer")


# --- characters a database cannot store -------------------------------------------------


@pytest.mark.parametrize("name", ["query", "custom_id", "model"])
def test_a_nul_character_in_a_field_stored_as_text_is_refused(name: str) -> None:
    error = request_error(with_fields(**{name: "a\x00b"}))
    assert (error.line, error.field) == (1, name)
    assert "NUL character" in str(error)


def test_a_nul_character_in_a_corpus_id_is_refused() -> None:
    error = corpus_error(json.dumps({"id": "a\x00", "text": "t"}))
    assert (error.line, error.field) == (1, "id")


def test_a_nul_character_in_a_document_is_kept_as_its_json_escape() -> None:
    """Documents are stored as JSON text, where a NUL is the escape \\u0000: it round-trips."""
    [request] = iter_requests([with_fields(documents=["a\x00b"])], default_model=MODEL)
    assert request.documents[0].content == '"a\\u0000b"'
    assert json.loads(request.documents[0].content) == "a\x00b"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"query": "q", "documents": ["a", "\\ud800"]}', "documents[1]"),
        ('{"query": "q", "documents": [{"text": "x\\uDFFF"}]}', "documents[0].text"),
        ('{"query": "\\udbff", "documents": ["a"]}', "query"),
        ('{"query": "q", "documents": ["a"], "\\ud800": 1}', "\\ud800"),
    ],
    ids=["document", "text-upper-case-escape", "query", "key"],
)
def test_a_lone_surrogate_escape_is_refused_naming_its_field(line: str, field: str) -> None:
    """json.loads accepts "\\ud800", but it is no character: UTF-8 (and so either database)
    cannot encode it. The error itself stays printable: the key is shown as its escape."""
    error = request_error(line)
    assert (error.line, error.field) == (1, field)
    assert "lone surrogate" in str(error)
    str(error).encode("utf-8")


def test_a_surrogate_pair_escape_is_the_character_it_encodes() -> None:
    [request] = iter_requests(
        ['{"query": "q", "documents": ["\\ud83d\\ude00"]}'], default_model=MODEL
    )
    assert json.loads(request.documents[0].content) == "\U0001f600"


def test_a_lone_surrogate_as_raw_bytes_is_not_utf8() -> None:
    error = request_error(b'{"query": "q", "documents": ["\xed\xa0\x80"]}')
    assert error.line == 1
    assert "not valid UTF-8" in str(error)


def test_a_lone_surrogate_in_a_text_line_is_refused() -> None:
    """Lines given as str (not bytes) can hold the character itself."""
    error = request_error('{"query": "q", "documents": ["\ud800"]}')
    assert error.line == 1
    assert "lone surrogate" in str(error)


# --- numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("top_n", [2**31, 10**30])
def test_top_n_over_its_integer_column_is_refused_naming_the_cap(top_n: int) -> None:
    error = request_error(with_fields(top_n=top_n))
    assert (error.line, error.field) == (1, "top_n")
    assert "over the cap of 2,147,483,647" in str(error)


def test_top_n_at_its_cap_is_accepted() -> None:
    [request] = iter_requests([with_fields(top_n=2**31 - 1)], default_model=MODEL)
    assert request.top_n == 2**31 - 1


def test_an_integer_literal_past_pythons_digit_limit_is_bad_json() -> None:
    """json.loads raises ValueError (not JSONDecodeError) for it."""
    error = request_error('{"query": "q", "documents": ["a"], "top_n": ' + "9" * 5000 + "}")
    assert error.line == 1
    assert "not valid JSON (a number of more than 4,300 digits)" in str(error)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "5.0"])
def test_nan_and_infinity_tokens_are_not_a_top_n(token: str) -> None:
    error = request_error('{"query": "q", "documents": ["a"], "top_n": ' + token + "}")
    assert (error.field, error.reason) == ("top_n", "must be a positive integer")


# --- names and sizes over their caps -----------------------------------------------------


def test_a_model_name_over_its_column_is_refused() -> None:
    error = request_error(with_fields(model="m" * 101))
    assert (error.field, error.reason) == ("model", "101 characters, over the cap of 100")


def test_a_corpus_id_over_its_column_is_refused_also_as_a_long_integer() -> None:
    error = corpus_error(json.dumps({"id": 10**250, "text": "t"}))
    assert (error.field, error.reason) == ("id", "251 characters, over the cap of 200")


def test_a_document_over_the_cap_names_its_size_and_the_cap() -> None:
    big = "x" * (constants.DEFAULT_MAX_DOCUMENT_CHARS + 1)
    error = request_error(GOOD, "", with_fields(custom_id="big", documents=["a", "b", big]))
    assert str(error) == (
        "line 3, field 'documents[2]': 8,388,609 characters, over the cap of 8,388,608"
    )


def test_a_document_object_over_the_cap_names_its_text_field() -> None:
    error = request_error(
        with_fields(documents=[{"text": "x" * 11}]), limits=Limits(max_document_chars=10)
    )
    assert error.field == "documents[0].text"
    assert "11 characters, over the cap of 10" in str(error)


def test_a_corpus_document_over_the_cap_is_refused() -> None:
    with pytest.raises(errors.InputError) as caught:
        list(
            iter_corpus(
                ['"ok"', '{"text": "' + "x" * 11 + '"}'], limits=Limits(max_document_chars=10)
            )
        )
    assert (caught.value.line, caught.value.field) == (2, "text")


def test_more_documents_than_the_cap_are_refused() -> None:
    cap = constants.DEFAULT_MAX_DOCUMENTS_PER_REQUEST
    error = request_error(with_fields(documents=["d"] * (cap + 1)))
    assert (error.field, error.reason) == (
        "documents",
        "100,001 documents, over the cap of 100,000",
    )


def test_a_query_over_the_cap_is_refused() -> None:
    error = request_error(with_fields(query="q" * 61), limits=Limits(max_query_chars=60))
    assert (error.field, error.reason) == ("query", "61 characters, over the cap of 60")


def test_a_line_over_the_cap_is_refused_naming_the_cap() -> None:
    error = request_error(GOOD, with_fields(query="q" * 200), limits=Limits(max_line_bytes=100))
    assert (error.line, error.field) == (2, None)
    assert "longer than the cap of 100 bytes" in str(error)


def test_read_lines_never_reads_a_line_whole_past_the_cap() -> None:
    stream = io.BytesIO(b"short\n" + b"x" * 10_000 + b"\nnever read\n")
    lines = read_lines(stream, 100)
    assert next(lines) == b"short\n"
    assert len(next(lines)) == 101  # cut one byte past the cap, so the validator refuses it
    assert stream.tell() == 6 + 101


def test_an_unknown_field_with_a_huge_name_is_shown_cut_and_escaped() -> None:
    error = request_error(with_fields(**{"z\x00" + "y" * 10_000: 1}))
    assert error.field is not None
    assert error.field.startswith("z\\u0000yyy")
    assert len(str(error)) < 300


# --- what Windows and JSON writers produce is accepted ----------------------------------


def test_a_utf8_byte_order_mark_at_the_start_is_not_content() -> None:
    [request] = iter_requests([b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n"], default_model=MODEL)
    assert request.custom_id == "ok"
    [document] = iter_corpus([b"\xef\xbb\xbf" + b'"a"\r\n'])
    assert document.content == '"a"'


def test_a_byte_order_mark_alone_on_the_first_line_is_a_blank_line() -> None:
    [request] = iter_requests([b"\xef\xbb\xbf\r\n", GOOD.encode()], default_model=MODEL)
    assert request.custom_id == "ok"


def test_crlf_line_ends_and_blank_lines_are_accepted() -> None:
    lines = [GOOD.encode() + b"\r\n", b"\r\n", with_fields(custom_id="b").encode() + b"\r\n"]
    assert [r.custom_id for r in iter_requests(lines, default_model=MODEL)] == ["ok", "b"]


def test_a_utf16_file_is_refused_saying_to_save_it_as_utf8() -> None:
    data = ("\ufeff" + GOOD).encode("utf-16-le")
    error = request_error(data)
    assert error.line == 1
    assert "UTF-16" in str(error) and "save the file as UTF-8" in str(error)


def test_a_duplicate_key_keeps_the_last_value_as_json_parsers_do() -> None:
    [request] = iter_requests(
        ['{"query": "first", "query": "last", "documents": ["a"]}'], default_model=MODEL
    )
    assert request.query == "last"


def test_shown_names_are_ascii_and_short() -> None:
    assert shown("ok") == "ok"
    assert shown("\ud800") == "\\ud800"
    assert shown("x" * 100) == "x" * 60 + "..."
