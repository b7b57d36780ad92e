"""Requests and corpus files: what is accepted as given, and every bad line named by line and field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker import errors
from worker.ingest import (
    MAX_CUSTOM_ID_LENGTH,
    DocumentInput,
    RequestInput,
    iter_corpus,
    iter_requests,
)

DEFAULT_MODEL = "jina-reranker-m0"
TEXT_ONLY_MODEL = "jina-reranker-v2-base-multilingual"
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def requests_of(*lines: bytes | str, **kwargs: Any) -> list[RequestInput]:
    kwargs.setdefault("default_model", DEFAULT_MODEL)
    return list(iter_requests(list(lines), **kwargs))


def request_error(*lines: bytes | str, **kwargs: Any) -> errors.InputError:
    with pytest.raises(errors.InputError) as caught:
        requests_of(*lines, **kwargs)
    return caught.value


def corpus_error(*lines: bytes | str) -> errors.InputError:
    with pytest.raises(errors.InputError) as caught:
        list(iter_corpus(list(lines)))
    return caught.value


GOOD = {"custom_id": "ok-1", "query": "q", "documents": ["a"]}


# --- valid requests -------------------------------------------------------------------------


def test_every_document_form_is_kept_exactly_as_given() -> None:
    url = "https://example.com/a.png"
    documents = ["plain text ü", {"text": "object text"}, {"image": url}, {"image": PNG_BASE64}]
    [request] = requests_of(line({"custom_id": "q-1", "query": "find", "documents": documents}))

    assert [json.loads(d.content) for d in request.documents] == documents
    assert [d.is_image for d in request.documents] == [False, False, True, True]
    # Non-ASCII text is kept as it is, not \u-escaped.
    assert "ü" in request.documents[0].content
    assert all(d.doc_id is None for d in request.documents)


@pytest.mark.parametrize(
    "text",
    ["plain", 'quote " and backslash \\', "new\nline\ttab\x01", "ünïcødé ✓ 𝄞", "</script>"],
    ids=["plain", "escapes", "controls", "non-ascii", "slash"],
)
def test_document_content_is_compact_json_with_non_ascii_kept(text: str) -> None:
    documents = [text, {"text": text}, {"image": text}]
    [request] = requests_of(line({"query": "q", "documents": documents}))
    assert [d.content for d in request.documents] == [
        json.dumps(d, ensure_ascii=False, separators=(",", ":")) for d in documents
    ]
    [corpus_doc] = iter_corpus([line({"id": 7, "text": text})])
    assert corpus_doc.content == json.dumps(
        {"text": text}, ensure_ascii=False, separators=(",", ":")
    )


def test_all_fields_given_are_carried_over() -> None:
    [request] = requests_of(
        line(
            {
                "custom_id": "q-7",
                "query": "what",
                "documents": ["a", "b"],
                "top_n": 1,
                "model": TEXT_ONLY_MODEL,
                "return_documents": True,
            }
        )
    )
    assert request == RequestInput(
        position=0,
        custom_id="q-7",
        query="what",
        model=TEXT_ONLY_MODEL,
        top_n=1,
        return_documents=True,
        documents=[DocumentInput('"a"', is_image=False), DocumentInput('"b"', is_image=False)],
    )


def test_custom_id_is_generated_from_the_line_number_when_absent() -> None:
    requests = requests_of(
        line({"query": "q", "documents": ["a"]}),
        "",
        line({"query": "q", "documents": ["b"]}),
    )
    assert [r.custom_id for r in requests] == ["line-1", "line-3"]


def test_defaults_for_model_top_n_and_return_documents_apply_when_absent() -> None:
    [request] = requests_of(
        line({"query": "q", "documents": ["a"]}),
        default_model="bge-reranker-v2-m3",
        default_top_n=5,
    )
    assert request.model == "bge-reranker-v2-m3"
    assert request.top_n == 5
    assert request.return_documents is False


def test_top_n_is_none_without_a_default() -> None:
    [request] = requests_of(line({"query": "q", "documents": ["a"]}))
    assert request.top_n is None


def test_a_requests_own_model_and_top_n_win_over_the_defaults() -> None:
    [request] = requests_of(
        line({"query": "q", "documents": ["a"], "model": TEXT_ONLY_MODEL, "top_n": 2}),
        default_model="bge-reranker-v2-m3",
        default_top_n=9,
    )
    assert (request.model, request.top_n) == (TEXT_ONLY_MODEL, 2)


def test_blank_lines_are_skipped_and_positions_count_only_requests() -> None:
    requests = requests_of(
        "\n",
        line({"custom_id": "a", "query": "q", "documents": ["x"]}) + "\n",
        "   \t\n",
        b"",
        line({"custom_id": "b", "query": "q", "documents": ["y"]}).encode(),
        line({"custom_id": "c", "query": "q", "documents": ["z"]}),
    )
    assert [(r.position, r.custom_id) for r in requests] == [(0, "a"), (1, "b"), (2, "c")]


def test_bytes_lines_are_decoded_as_utf8() -> None:
    [request] = requests_of(line({"query": "größe", "documents": ["ä"]}).encode())
    assert request.query == "größe"
    assert json.loads(request.documents[0].content) == "ä"


def test_an_image_document_is_accepted_by_a_model_that_takes_images() -> None:
    [request] = requests_of(line({"query": "q", "documents": [{"image": PNG_BASE64}]}))
    assert request.model == DEFAULT_MODEL
    assert request.documents[0].is_image


def test_requests_are_yielded_lazily_before_a_later_bad_line() -> None:
    it = iter_requests([line(GOOD), "{not json"], default_model=DEFAULT_MODEL)
    assert next(it).custom_id == "ok-1"
    with pytest.raises(errors.InputError) as caught:
        next(it)
    assert caught.value.line == 2


# --- bad requests lines ---------------------------------------------------------------------


def test_invalid_json_names_the_line() -> None:
    error = request_error(line(GOOD), "", '{"query": "q", "documents": [}')
    assert error.line == 3
    assert error.field is None
    assert "not valid JSON" in str(error)
    assert str(error).startswith("line 3")


def test_invalid_utf8_names_the_line() -> None:
    error = request_error(line(GOOD).encode(), b'{"query": "\xff\xfe", "documents": ["a"]}')
    assert error.line == 2
    assert error.field is None
    assert "not valid UTF-8" in str(error)


@pytest.mark.parametrize(
    ("raw", "type_name"),
    [("[1, 2]", "list"), ('"text"', "str"), ("42", "int"), ("null", "NoneType")],
)
def test_a_line_that_is_not_an_object_is_rejected(raw: str, type_name: str) -> None:
    error = request_error(raw)
    assert error.line == 1
    assert error.field is None
    assert f"expected a JSON object, got {type_name}" in str(error)


def test_an_unknown_field_is_named() -> None:
    error = request_error(line({**GOOD, "documnets": ["typo"]}))
    assert (error.line, error.field) == (1, "documnets")
    assert "unknown field 'documnets'" in str(error)


@pytest.mark.parametrize(
    "obj",
    [
        {"documents": ["a"]},
        {"query": "", "documents": ["a"]},
        {"query": "   ", "documents": ["a"]},
        {"query": None, "documents": ["a"]},
        {"query": 5, "documents": ["a"]},
    ],
    ids=["missing", "empty", "blank", "null", "number"],
)
def test_query_is_required_and_non_empty(obj: dict[str, Any]) -> None:
    error = request_error(line(GOOD), line(obj))
    assert (error.line, error.field) == (2, "query")
    assert "non-empty string" in str(error)


@pytest.mark.parametrize(
    "obj",
    [
        {"query": "q"},
        {"query": "q", "documents": []},
        {"query": "q", "documents": "a"},
        {"query": "q", "documents": {"text": "a"}},
        {"query": "q", "documents": None},
    ],
    ids=["missing", "empty", "string", "object", "null"],
)
def test_documents_must_be_a_non_empty_list(obj: dict[str, Any]) -> None:
    error = request_error(line(obj))
    assert (error.line, error.field) == (1, "documents")
    assert "non-empty list" in str(error)


@pytest.mark.parametrize(
    ("item", "type_name"), [(5, "int"), (None, "NoneType"), (["a"], "list"), (True, "bool")]
)
def test_a_document_of_the_wrong_type_is_named_by_index(item: Any, type_name: str) -> None:
    error = request_error(line({"query": "q", "documents": ["a", item]}))
    assert (error.line, error.field) == (1, "documents[1]")
    assert f"not {type_name}" in str(error)


@pytest.mark.parametrize("text", ["", "  \n "])
def test_an_empty_text_document_is_rejected(text: str) -> None:
    error = request_error(line({"query": "q", "documents": [text]}))
    assert (error.line, error.field) == (1, "documents[0]")
    assert "empty" in str(error)


@pytest.mark.parametrize(
    "doc", [{"text": "a", "image": "https://x/y.png"}, {}], ids=["both", "neither"]
)
def test_a_document_object_needs_exactly_one_of_text_or_image(doc: dict[str, Any]) -> None:
    error = request_error(line({"query": "q", "documents": ["a", "b", doc]}))
    assert (error.line, error.field) == (1, "documents[2]")
    assert "exactly one of 'text' or 'image'" in str(error)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"image": ""}, "documents[0].image"),
        ({"image": "   "}, "documents[0].image"),
        ({"image": 7}, "documents[0].image"),
        ({"text": ""}, "documents[0].text"),
        ({"text": None}, "documents[0].text"),
    ],
)
def test_an_empty_or_non_string_text_or_image_is_named(doc: dict[str, Any], field: str) -> None:
    error = request_error(line({"query": "q", "documents": [doc]}))
    assert (error.line, error.field) == (1, field)
    assert "must be a non-empty string" in str(error)


def test_an_unknown_document_field_is_named() -> None:
    error = request_error(line({"query": "q", "documents": ["a", {"text": "b", "lang": "en"}]}))
    assert (error.line, error.field) == (1, "documents[1].lang")
    assert "unknown field 'lang'" in str(error)


def test_an_id_inside_a_requests_document_is_an_unknown_field() -> None:
    error = request_error(line({"query": "q", "documents": [{"id": "d1", "text": "b"}]}))
    assert (error.line, error.field) == (1, "documents[0].id")


@pytest.mark.parametrize("top_n", [0, -3, True, False, "5", 2.5], ids=repr)
def test_top_n_must_be_a_positive_integer(top_n: Any) -> None:
    error = request_error(line({**GOOD, "top_n": top_n}))
    assert (error.line, error.field) == (1, "top_n")
    assert "positive integer" in str(error)


@pytest.mark.parametrize("value", ["true", 1, None, "false"], ids=repr)
def test_return_documents_must_be_a_boolean(value: Any) -> None:
    error = request_error(line({**GOOD, "return_documents": value}))
    assert (error.line, error.field) == (1, "return_documents")
    assert "true or false" in str(error)


@pytest.mark.parametrize("model", ["", "   ", 3, None], ids=repr)
def test_model_must_be_a_non_empty_string(model: Any) -> None:
    error = request_error(line({**GOOD, "model": model}))
    assert (error.line, error.field) == (1, "model")
    assert "non-empty string" in str(error)


def test_an_image_document_with_a_text_only_model_is_rejected() -> None:
    obj = {"query": "q", "documents": ["a", {"image": "https://x/y.png"}], "model": TEXT_ONLY_MODEL}
    error = request_error(line(GOOD), line(obj))
    assert (error.line, error.field) == (2, "documents[1]")
    assert f"model '{TEXT_ONLY_MODEL}' does not take image documents" in str(error)


def test_an_image_document_with_a_text_only_default_model_is_rejected() -> None:
    error = request_error(
        line({"query": "q", "documents": [{"image": PNG_BASE64}]}), default_model=TEXT_ONLY_MODEL
    )
    assert (error.line, error.field) == (1, "documents[0]")
    assert "does not take image documents" in str(error)


def test_a_duplicate_custom_id_names_the_first_line() -> None:
    error = request_error(
        line({"custom_id": "dup", "query": "q", "documents": ["a"]}),
        "",
        line({"custom_id": "other", "query": "q", "documents": ["a"]}),
        line({"custom_id": "dup", "query": "q", "documents": ["b"]}),
    )
    assert (error.line, error.field) == (4, "custom_id")
    assert "duplicate custom_id 'dup' (first on line 1)" in str(error)


@pytest.mark.parametrize(
    "custom_id",
    ["x" * (MAX_CUSTOM_ID_LENGTH + 1), "", 12, None],
    ids=["too-long", "empty", "int", "null"],
)
def test_custom_id_must_be_a_short_non_empty_string(custom_id: Any) -> None:
    error = request_error(line({**GOOD, "custom_id": custom_id}))
    assert (error.line, error.field) == (1, "custom_id")
    assert str(MAX_CUSTOM_ID_LENGTH) in error.reason


def test_a_custom_id_of_the_maximum_length_is_accepted() -> None:
    [request] = requests_of(line({**GOOD, "custom_id": "x" * MAX_CUSTOM_ID_LENGTH}))
    assert len(request.custom_id) == MAX_CUSTOM_ID_LENGTH


@pytest.mark.parametrize(
    "lines", [[], [""], ["\n", "  ", b"\n"]], ids=["none", "one-blank", "blanks"]
)
def test_a_file_without_requests_is_rejected(lines: list[bytes | str]) -> None:
    error = request_error(*lines)
    assert error.line is None
    assert error.field is None
    assert "no requests" in str(error)


# --- corpus files ---------------------------------------------------------------------------


def test_corpus_documents_keep_their_form_and_ids() -> None:
    docs = list(
        iter_corpus(
            [
                line("plain"),
                "",
                line({"id": "d-2", "text": "with id"}),
                line({"id": 3, "image": "https://x/y.png"}).encode(),
                line({"image": PNG_BASE64}),
            ]
        )
    )
    assert [json.loads(d.content) for d in docs] == [
        "plain",
        {"text": "with id"},
        {"image": "https://x/y.png"},
        {"image": PNG_BASE64},
    ]
    # The id is taken off the document sent upstream and kept as a string.
    assert [d.doc_id for d in docs] == [None, "d-2", "3", None]
    assert [d.is_image for d in docs] == [False, False, True, True]


@pytest.mark.parametrize("doc_id", [True, 1.5, None, ["a"], {"k": 1}], ids=repr)
def test_a_corpus_id_of_the_wrong_type_is_named(doc_id: Any) -> None:
    error = corpus_error(line("ok"), line({"id": doc_id, "text": "t"}))
    assert (error.line, error.field) == (2, "id")
    assert "string or an integer" in str(error)


def test_a_corpus_line_with_an_unknown_field_is_named() -> None:
    error = corpus_error(line({"id": "a", "text": "t", "score": 1}))
    assert (error.line, error.field) == (1, "score")
    assert "unknown field 'score'" in str(error)


def test_a_corpus_object_without_text_or_image_is_rejected() -> None:
    error = corpus_error(line("ok"), line({"id": "only-id"}))
    assert error.line == 2
    assert "exactly one of 'text' or 'image'" in str(error)


def test_a_corpus_line_that_is_not_json_names_the_line() -> None:
    error = corpus_error(line("ok"), "", "plain words")
    assert error.line == 3
    assert "not valid JSON" in str(error)


def test_a_corpus_line_with_invalid_utf8_names_the_line() -> None:
    error = corpus_error(b'"caf\xe9"')
    assert error.line == 1
    assert "not valid UTF-8" in str(error)


@pytest.mark.parametrize("lines", [[], ["", "  "]], ids=["none", "blanks"])
def test_an_empty_corpus_is_rejected(lines: list[str]) -> None:
    error = corpus_error(*lines)
    assert error.line is None
    assert "no documents" in str(error)


@pytest.mark.parametrize("raw", ['""', "5"], ids=["empty-string", "number"])
def test_a_bad_corpus_line_does_not_name_an_empty_field(raw: str) -> None:
    error = corpus_error(raw)
    assert error.line == 1
    assert error.field is None
    assert "field ''" not in str(error)
