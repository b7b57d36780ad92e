"""Hostile input for the submit path, and the property every door of it must keep.

The strategies build whole input files as bytes: requests files and corpus files whose lines
are now well formed, now broken in the ways strangers break them (deep nesting, numbers too
large for any column, NaN and Infinity tokens, NUL and lone-surrogate escapes, bytes that are
not UTF-8, a byte-order mark, CRLF line ends, empty lines, duplicate keys, a wrong type in
any field, values over their caps). `check_submit_entry` takes "an entry", a callable that
submits such a file through one door (the CLI process, the use-case function, the HTTP API)
and says whether a job was stored, and checks what must hold whatever the door:

- refused input leaves nothing stored (rows of job, request and document are counted);
- accepted input is stored as given: each request's documents, in order, equal the file's.

An entry checks its own door's contract (the CLI: exit 0 or 2, never a traceback; the use
case: success or InputError) and raises AssertionError when it is broken.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from sqlalchemy import text

from worker.db.session import get_engine

# Small caps, so that the fuzz reaches them; applied to every door under test as settings.
FUZZ_CAPS = {
    "RERANK_MAX_LINE_BYTES": "4000",
    "RERANK_MAX_DOCUMENT_CHARS": "40",
    "RERANK_MAX_DOCUMENTS_PER_REQUEST": "6",
    "RERANK_MAX_QUERY_CHARS": "60",
}
BOM = b"\xef\xbb\xbf"
MODELS = ["jina-reranker-m0", "jina-reranker-v2-base-multilingual", "jina-reranker-v3"]


@dataclass(frozen=True)
class HostileSubmit:
    """One submit to make: the file's bytes and the options a door passes with it."""

    data: bytes
    query: str | None = None  # set: a corpus file ranked against it
    top_n: int | None = None
    model: str | None = None


# A door: submits, returns the stored job's id, or None when the input was refused.
Entry = Callable[[HostileSubmit], str | None]


# --- JSON text, written by hand where json.dumps would not write it ------------------------

# Strings: ordinary text, strings with a NUL or a lone surrogate, near and over the caps.
hostile_strings = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=8),
    st.sampled_from(
        ["", " ", "\x00", "a\x00b", "\ud800", "x\udfff", "\ud83d\ude00", "\ufeff", "\r\n", "ü"]
    ),
    st.integers(35, 45).map(lambda n: "d" * n),
    st.integers(190, 210).map(lambda n: "c" * n),
)
hostile_numbers = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1.0, 1e400, -0.0]),
)


def _string_json(value: str, ascii_only: bool) -> str:
    """ensure_ascii writes a lone surrogate as its escape; without it the character itself
    stays in the text (and becomes bytes that are not UTF-8 when the line is encoded)."""
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def json_text(draw: st.DrawFn, max_leaves: int = 6) -> str:
    """Any JSON value as text: scalars, lists, objects with duplicate keys, big numbers."""
    ascii_only = draw(st.booleans())
    leaf = st.one_of(
        st.just("null"),
        st.sampled_from(["true", "false"]),
        hostile_numbers.map(json.dumps),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "9" * 5000, "1" * 400]),
        hostile_strings.map(lambda s: _string_json(s, ascii_only)),
    )

    def containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        lists = st.lists(children, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        pairs = st.lists(
            st.tuples(st.sampled_from(["text", "image", "id", "query", "x"]), children),
            max_size=3,
        )
        objects = pairs.map(lambda kv: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in kv) + "}")
        return st.one_of(lists, objects)

    return draw(st.recursive(leaf, containers, max_leaves=max_leaves))


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    depth = draw(st.sampled_from([2, 31, 32, 33, 200, 990, 5000, 20000]))
    inner = draw(st.sampled_from(['"a"', "1", "[]", "{}"]))
    if draw(st.booleans()):
        return "[" * depth + inner + "]" * depth
    return '{"text":' * depth + inner + "}" * depth


def one_time_in(n: int) -> st.SearchStrategy[bool]:
    """True about one time in `n`; shrinks towards False."""
    return st.integers(1, n).map(lambda k: k == n)


def sometimes(
    good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], one_in: int
) -> st.SearchStrategy[Any]:
    """`good`, but one time in `one_in` (about) `bad`; shrinks towards `good`."""
    return st.integers(1, one_in).flatmap(lambda n: bad if n == one_in else good)


def field_value(good: st.SearchStrategy[str], one_in: int = 12) -> st.SearchStrategy[str]:
    """Mostly a good value of the field, now and then a hostile string (NUL, a lone
    surrogate, over a cap), any JSON at all, or deep nesting."""
    bad = st.one_of(hostile_strings.map(json.dumps), json_text(), deep_nesting())
    return sometimes(good, bad, one_in)


good_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=10
)
good_document = st.one_of(
    good_text.filter(str.strip).map(json.dumps),
    good_text.filter(str.strip).map(lambda t: json.dumps({"text": t}, ensure_ascii=False)),
    st.just('{"image": "https://example.test/a.png"}'),
)
good_documents = sometimes(
    st.lists(field_value(good_document, one_in=40), min_size=1, max_size=6),
    st.lists(good_document, min_size=7, max_size=8),  # over the cap of FUZZ_CAPS
    20,
).map(lambda docs: "[" + ",".join(docs) + "]")


@st.composite
def request_line(draw: st.DrawFn) -> str:
    """A request object as JSON text; fields missing, repeated, unknown or of any type."""
    fields: list[tuple[str, str]] = [
        ("custom_id", draw(field_value(st.uuids().map(lambda u: json.dumps(u.hex[:12]))))),
        ("query", draw(field_value(good_text.filter(str.strip).map(json.dumps)))),
        ("documents", draw(field_value(good_documents))),
    ]
    optional = {
        "top_n": field_value(st.integers(1, 20).map(str)),
        "model": field_value(st.sampled_from(MODELS).map(json.dumps)),
        "return_documents": field_value(st.sampled_from(["true", "false"])),
        "unknown": json_text(),
    }
    for name, strategy in optional.items():
        if draw(one_time_in(20 if name == "unknown" else 4)):
            fields.append((name, draw(strategy)))
    if draw(one_time_in(10)):  # a key twice: the parser keeps the last
        fields.append(draw(st.sampled_from(fields)))
    draw(st.randoms()).shuffle(fields)
    kept = [f for f in fields if not draw(one_time_in(15))]  # now and then one missing
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in kept) + "}"


@st.composite
def corpus_line(draw: st.DrawFn) -> str:
    document = draw(field_value(good_document))
    if document.startswith("{") and not draw(one_time_in(3)):
        ident = draw(field_value(st.integers(0, 10**6).map(str)))
        return '{"id": ' + ident + ", " + document[1:]
    return document


def _encoded(line: str) -> bytes:
    return line.encode("utf-8", "surrogatepass")  # a raw lone surrogate: not UTF-8


@st.composite
def raw_line(draw: st.DrawFn, line: st.SearchStrategy[str]) -> bytes:
    """A line as bytes, sometimes with bytes no JSON text holds."""
    data = _encoded(draw(sometimes(line, st.one_of(json_text(), deep_nesting()), 15)))
    damage = draw(st.integers(0, 40))
    if damage == 40 and data:
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]))
        data = data[:at] + junk + data[at:]
    elif damage == 39:
        data = data[: draw(st.integers(0, len(data)))]  # cut short
    elif damage == 38:
        data = b"x" * 5000  # over the line cap of FUZZ_CAPS
    return data


@st.composite
def hostile_file(draw: st.DrawFn, line: st.SearchStrategy[str]) -> bytes:
    """A file of such lines, with Windows' line ends and byte-order mark now and then, and
    empty or blank lines among them."""
    blank = st.sampled_from([b"", b"  ", b"\r"])
    lines = draw(st.lists(sometimes(raw_line(line), blank, 6), min_size=1, max_size=4))
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = b"".join(line + end for line in lines)
    if draw(one_time_in(4)):
        data = BOM + data
    return data


option_text = sometimes(good_text, hostile_strings, 5)


@st.composite
def hostile_submits(draw: st.DrawFn) -> HostileSubmit:
    """A requests file or a corpus file, with options that may be hostile too."""
    corpus = draw(one_time_in(4))
    data = draw(hostile_file(corpus_line() if corpus else request_line()))
    top_n = draw(sometimes(st.none(), st.sampled_from([0, 3, 2**31 - 1, 2**31, 10**30]), 6))
    model = draw(sometimes(st.none(), st.one_of(st.sampled_from(MODELS), option_text), 6))
    query = draw(option_text) if corpus else None
    return HostileSubmit(data=data, query=query, top_n=top_n, model=model)


# --- the property -----------------------------------------------------------------------


def row_counts(database_url: str) -> dict[str, int]:
    with get_engine(database_url).connect() as connection:
        return {
            table: int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("job", "request", "document")
        }


def stored_documents(database_url: str, job_id: str) -> list[list[tuple[Any, str | None]]]:
    """Each request's documents in order, as (the JSON value given, its id)."""
    query = text(
        "SELECT request.position, document.content, document.doc_id FROM request "
        "JOIN document ON document.request_id = request.id WHERE request.job_id = :job "
        "ORDER BY request.position, document.position"
    )
    requests: dict[int, list[tuple[Any, str | None]]] = {}
    with get_engine(database_url).connect() as connection:
        for position, content, doc_id in connection.execute(query, {"job": job_id}):
            requests.setdefault(position, []).append((json.loads(content), doc_id))
    return [requests[p] for p in sorted(requests)]


def given_documents(submit: HostileSubmit) -> list[list[tuple[Any, str | None]]]:
    """What an accepted file's documents are, read with the plain json module."""
    data = submit.data.removeprefix(BOM)
    values = [json.loads(line) for line in data.split(b"\n") if line.strip()]
    if submit.query is None:
        return [[(doc, None) for doc in value["documents"]] for value in values]
    corpus = []
    for value in values:
        if isinstance(value, dict) and "id" in value:
            ident = str(value.pop("id"))
            corpus.append((value, ident))
        else:
            corpus.append((value, None))
    return [corpus]


def check_submit_entry(entry: Entry, submit: HostileSubmit, database_url: str) -> None:
    """The property of the submit path, for any door: refused input stores nothing,
    accepted input is stored as given."""
    before = row_counts(database_url)
    job_id = entry(submit)
    if job_id is None:
        assert row_counts(database_url) == before, "refused input left rows behind"
        return
    assert row_counts(database_url)["job"] == before["job"] + 1
    assert stored_documents(database_url, job_id) == given_documents(submit)
