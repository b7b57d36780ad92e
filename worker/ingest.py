"""Parse and validate requests files, line by line, without holding the file in memory.

Two forms (see CONTRACT.md): a requests file (one request per line) and a corpus file
(one document per line, all ranked against one `--query`). Every error names the
1-based line number and the field.

Input comes from strangers, so whatever the JSON parser, Python's codecs or a database would
refuse is refused here first, as an InputError, the same on every database: a line, a
document, a request over its cap; JSON nested deeper than MAX_JSON_DEPTH; numbers too large
for their column; NUL characters where they would be stored as they are; lone surrogates. The
checks cost nothing on ordinary lines: a rare escape is looked for in the raw line before the
parsed value is walked, and nesting is measured only once a line is refused anyway.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from worker import catalog, constants, errors

REQUEST_FIELDS = frozenset(
    {"custom_id", "query", "documents", "top_n", "model", "return_documents"}
)
MAX_CUSTOM_ID_LENGTH = constants.MAX_CUSTOM_ID_CHARS
MAX_DOC_ID_CHARS = constants.MAX_DOC_ID_CHARS
# Fields stored as they are (not as JSON text), where a NUL character cannot go.
REQUEST_TEXT_FIELDS = ("custom_id", "query", "model")
CORPUS_TEXT_FIELDS = ("id",)
UTF8_BYTE_ORDER_MARK = "\ufeff".encode()
UTF16_BYTE_ORDER_MARKS = (b"\xff\xfe", b"\xfe\xff")
# Strings (skipped whole) and brackets: enough to measure how deep a line nests.
_NESTING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
# A name from the input shown in an error is cut to this many characters.
SHOWN_NAME_CHARS = 60


@dataclass(frozen=True)
class Limits:
    """Size caps on input; the defaults are in constants, an operator may change them
    (settings.input_limits())."""

    max_line_bytes: int = constants.DEFAULT_MAX_LINE_BYTES
    max_document_chars: int = constants.DEFAULT_MAX_DOCUMENT_CHARS
    max_documents_per_request: int = constants.DEFAULT_MAX_DOCUMENTS_PER_REQUEST
    max_query_chars: int = constants.DEFAULT_MAX_QUERY_CHARS


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class DocumentInput:
    """A document as given (`content` is its JSON text) and, in corpus files, its `id`."""

    content: str
    is_image: bool
    doc_id: str | None = None


@dataclass
class RequestInput:
    position: int
    custom_id: str
    query: str
    model: str
    top_n: int | None
    return_documents: bool
    documents: list[DocumentInput] = field(default_factory=list)
    # Set where the line was parsed only to validate it (iter_requests(keep_documents=False)):
    # `documents` may then be empty, and this counts what the line held.
    checked_documents: int | None = None

    @property
    def document_count(self) -> int:
        return len(self.documents) if self.checked_documents is None else self.checked_documents


def read_lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[bytes]:
    """The stream's lines, none read past the cap: a longer line is cut one byte after it
    (and refused by the validator) rather than held whole in memory."""
    readline = stream.readline
    limit = max_line_bytes + 1
    while line := readline(limit):
        yield line


def over_cap(size: int, unit: str, cap: int) -> str:
    return f"{size:,} {unit}, over the cap of {cap:,}"


def shown(name: str) -> str:
    """A name taken from the input, safe to print and to encode: escapes for what is not
    printable ASCII, cut to SHOWN_NAME_CHARS."""
    escaped = json.dumps(name)[1:-1]
    if len(escaped) > SHOWN_NAME_CHARS:
        return escaped[:SHOWN_NAME_CHARS] + "..."
    return escaped


def _without_byte_order_mark(raw: bytes | str) -> bytes | str:
    """A file saved on Windows may start with a UTF-8 byte-order mark: it is not content."""
    if isinstance(raw, bytes):
        return raw.removeprefix(UTF8_BYTE_ORDER_MARK)
    return raw.removeprefix("\ufeff")


def _unreadable(raw: bytes | str, exc: ValueError, line_no: int) -> errors.InputError:
    """The error for a line that is not UTF-8 or not JSON (or an integer too long for
    Python: json.loads raises a plain ValueError for it)."""
    if isinstance(exc, UnicodeDecodeError):
        if line_no == 1 and isinstance(raw, bytes) and raw.startswith(UTF16_BYTE_ORDER_MARKS):
            reason = "it is UTF-16 (a UTF-16 byte-order mark); save the file as UTF-8"
        else:
            reason = f"byte {exc.start + 1}: {exc.reason}"
        return errors.InputError(f"not valid UTF-8 ({reason})", line=line_no)
    if isinstance(exc, json.JSONDecodeError):
        return errors.InputError(f"not valid JSON ({exc.msg}, column {exc.colno})", line=line_no)
    return errors.InputError(
        f"not valid JSON (a number of more than {sys.get_int_max_str_digits():,} digits)",
        line=line_no,
    )


def _text_line(raw: str, line_no: int) -> str:
    """A line given as str (not bytes) can hold a lone surrogate as it is."""
    if not raw.isascii() and not _encodes(raw):
        raise errors.InputError(
            "holds a lone surrogate, which is not a character (UTF-8 cannot encode it)",
            line=line_no,
        )
    return raw


def _parsed_lines(
    lines: Iterable[bytes | str], text_fields: tuple[str, ...], max_line_bytes: int
) -> Iterator[tuple[int, str, Any]]:
    """(line number, text, JSON value) of each line that is not blank; InputError for a
    line over the cap, not UTF-8, not JSON, or holding what no database stores."""
    loads = json.loads
    for line_no, raw in enumerate(lines, start=1):
        if line_no == 1:
            raw = _without_byte_order_mark(raw)
        if not raw.strip():
            continue
        if len(raw) > max_line_bytes:
            raise errors.InputError(
                f"the line is longer than the cap of {max_line_bytes:,} bytes", line=line_no
            )
        try:
            text = raw.decode() if isinstance(raw, bytes) else _text_line(raw, line_no)
            value = loads(text)
        except RecursionError:
            raise _too_deep(line_no) from None
        except ValueError as exc:
            raise _unreadable(raw, exc, line_no) from None
        if "\\u" in text:  # one scan for both escapes looked for closer
            _check_characters(text, value, line_no, text_fields)
        yield line_no, text, value


def _too_deep(line_no: int) -> errors.InputError:
    return errors.InputError(
        f"nested deeper than the cap of {constants.MAX_JSON_DEPTH} levels", line=line_no
    )


def _nests_deeper_than(text: str, cap: int) -> bool:
    depth = 0
    for token in _NESTING_TOKEN.finditer(text):
        bracket = text[token.start()]
        if bracket in "[{":
            depth += 1
            if depth > cap:
                return True
        elif bracket in "]}":
            depth -= 1
    return False


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored as it is (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character (\\u0000), which the database cannot store"
    if not _encodes(text):
        return "holds a lone surrogate, which is not a character (UTF-8 cannot encode it)"
    return None


def _lone_surrogate_at(value: Any) -> str | None:
    """The path of the first string (or key) in `value` that UTF-8 cannot encode; walked
    without recursion, as `value` may nest deep."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return path
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                inner_path = f"{path}.{shown(key)}" if path else shown(key)
                if not _encodes(key):
                    return inner_path
                stack.append((inner_path, inner))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", inner) for i, inner in reversed(list(enumerate(item))))
    return None


def _check_characters(text: str, value: Any, line_no: int, text_fields: Iterable[str]) -> None:
    """Refuse lone surrogates anywhere and NUL characters in fields stored as they are.

    Both can only come from escapes (raw ones are invalid UTF-8 or invalid JSON), so only
    a line holding such an escape is looked at closer."""
    if "\\ud" in text or "\\uD" in text:
        where = _lone_surrogate_at(value)
        if where is not None:
            raise errors.InputError(
                "holds a lone surrogate (a \\ud800-\\udfff escape outside a pair), which is "
                "not a character (UTF-8 cannot encode it)",
                line=line_no,
                field=where or None,
            )
    if "\\u0000" in text and isinstance(value, dict):
        for name in text_fields:
            inner = value.get(name)
            if isinstance(inner, str) and "\x00" in inner:
                raise errors.InputError(
                    "holds a NUL character (\\u0000), which the database cannot store",
                    line=line_no,
                    field=name,
                )


# A string as JSON text, non-ASCII kept: the C function that json.dumps(s, ensure_ascii=False)
# ends in, without its per-call set-up.
_encode_string = json.encoder.encode_basestring
DOCUMENT_KINDS = ("text", "image")


def parse_document(
    value: Any,
    *,
    line_no: int,
    where: str,
    allow_id: bool = False,
    max_chars: int = constants.DEFAULT_MAX_DOCUMENT_CHARS,
) -> DocumentInput:
    """A string, {"text": str} or {"image": URL or base64}; content kept exactly as given
    (compact JSON, non-ASCII unescaped)."""
    if isinstance(value, str):
        if not value.strip():
            raise errors.InputError("document text is empty", line=line_no, field=where or None)
        if len(value) > max_chars:
            raise errors.InputError(
                over_cap(len(value), "characters", max_chars), line=line_no, field=where or None
            )
        return DocumentInput(_encode_string(value), is_image=False)
    if not isinstance(value, dict):
        raise errors.InputError(
            f'a document must be a string, {{"text": ...}} or {{"image": ...}}, '
            f"not {type(value).__name__}",
            line=line_no,
            field=where or None,
        )
    doc_id = _document_id(value["id"], line_no, where) if allow_id and "id" in value else None
    kind = _document_kind(value, line_no, where, allow_id)
    inner = value[kind]
    if not isinstance(inner, str) or not inner.strip():
        raise errors.InputError("must be a non-empty string", line=line_no, field=_sub(where, kind))
    if len(inner) > max_chars:
        raise errors.InputError(
            over_cap(len(inner), "characters", max_chars), line=line_no, field=_sub(where, kind)
        )
    return DocumentInput(
        f'{{"{kind}":{_encode_string(inner)}}}', is_image=kind == "image", doc_id=doc_id
    )


def _sub(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _document_id(raw_id: Any, line_no: int, where: str) -> str:
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise errors.InputError("must be a string or an integer", line=line_no, field=f"{where}id")
    doc_id = str(raw_id)
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise errors.InputError(
            over_cap(len(doc_id), "characters", constants.MAX_DOC_ID_CHARS),
            line=line_no,
            field=f"{where}id",
        )
    return doc_id


def _document_kind(body: dict[str, Any], line_no: int, where: str, allow_id: bool) -> str:
    """'text' or 'image', whichever the document object holds; any other field is an error."""
    if len(body) - (allow_id and "id" in body) == 1:  # the common case, in two lookups
        if "text" in body:
            return "text"
        if "image" in body:
            return "image"
    extra = [k for k in body if k not in DOCUMENT_KINDS and not (allow_id and k == "id")]
    if extra:
        name = shown(min(extra))
        raise errors.InputError(
            f"unknown field '{name}'", line=line_no, field=f"{where}.{name}" if where else name
        )
    kinds = [k for k in DOCUMENT_KINDS if k in body]
    if len(kinds) != 1:
        raise errors.InputError(
            "a document object needs exactly one of 'text' or 'image'",
            line=line_no,
            field=where or None,
        )
    return kinds[0]


def _check_model(model: str, documents: list[DocumentInput], line_no: int, where: str) -> None:
    spec = catalog.MODELS.get(model)
    if spec is None or spec.accepts_images:
        return
    for i, doc in enumerate(documents):
        if doc.is_image:
            raise errors.InputError(
                f"model '{model}' does not take image documents",
                line=line_no,
                field=f"{where}[{i}]",
            )


def _optional_top_n(value: Any, line_no: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.InputError("must be a positive integer", line=line_no, field="top_n")
    if value > constants.MAX_TOP_N:
        raise errors.InputError(
            f"over the cap of {constants.MAX_TOP_N:,}", line=line_no, field="top_n"
        )
    return value


def _text_field(
    obj: dict[str, Any], name: str, default: str | None, cap: int, line_no: int, what: str
) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise errors.InputError(what, line=line_no, field=name)
    if len(value) > cap:
        raise errors.InputError(over_cap(len(value), "characters", cap), line=line_no, field=name)
    return value


def _documents(
    raw_documents: Any, line_no: int, limits: Limits, keep: bool = True
) -> list[DocumentInput]:
    """The line's documents, validated; without `keep`, plain strings are only checked
    (making their DocumentInputs is most of a large file's parse) and the list is empty."""
    if not isinstance(raw_documents, list) or not raw_documents:
        raise errors.InputError("required, a non-empty list", line=line_no, field="documents")
    cap = limits.max_documents_per_request
    if len(raw_documents) > cap:
        raise errors.InputError(
            over_cap(len(raw_documents), "documents", cap), line=line_no, field="documents"
        )
    max_chars = limits.max_document_chars
    # The common case, plain strings within their cap: built in one comprehension, without
    # a call or a field name per document (this loop is most of a large file's parse).
    if all(type(doc) is str and len(doc) <= max_chars and doc.strip() for doc in raw_documents):
        return [DocumentInput(_encode_string(doc), False) for doc in raw_documents] if keep else []
    return [
        parse_document(doc, line_no=line_no, where=f"documents[{i}]", max_chars=max_chars)
        for i, doc in enumerate(raw_documents)
    ]


def parse_request(
    obj: Any,
    *,
    line_no: int,
    position: int,
    default_model: str,
    default_top_n: int | None,
    limits: Limits = DEFAULT_LIMITS,
    keep_documents: bool = True,
) -> RequestInput:
    if not isinstance(obj, dict):
        raise errors.InputError(f"expected a JSON object, got {type(obj).__name__}", line=line_no)
    unknown = sorted(set(obj) - REQUEST_FIELDS)
    if unknown:
        name = shown(unknown[0])
        raise errors.InputError(f"unknown field '{name}'", line=line_no, field=name)
    custom_id = obj.get("custom_id", f"line-{line_no}")
    if not isinstance(custom_id, str) or not custom_id:
        raise errors.InputError(
            f"must be a non-empty string of at most {MAX_CUSTOM_ID_LENGTH} characters",
            line=line_no,
            field="custom_id",
        )
    if len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        raise errors.InputError(
            over_cap(len(custom_id), "characters", MAX_CUSTOM_ID_LENGTH),
            line=line_no,
            field="custom_id",
        )
    query = _text_field(
        obj, "query", None, limits.max_query_chars, line_no, "required, a non-empty string"
    )
    raw_documents: Any = obj.get("documents")
    documents = _documents(raw_documents, line_no, limits, keep_documents)
    model = _text_field(
        obj,
        "model",
        default_model,
        constants.MAX_MODEL_CHARS,
        line_no,
        "must be a non-empty string",
    )
    _check_model(model, documents, line_no, "documents")
    return_documents = obj.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise errors.InputError("must be true or false", line=line_no, field="return_documents")
    top_n = _optional_top_n(obj.get("top_n"), line_no)
    return RequestInput(
        position=position,
        custom_id=custom_id,
        query=query,
        model=model,
        top_n=top_n if top_n is not None else default_top_n,
        return_documents=return_documents,
        documents=documents,
        checked_documents=None if keep_documents else len(raw_documents),
    )


def iter_requests(
    lines: Iterable[bytes | str],
    *,
    default_model: str,
    default_top_n: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    keep_documents: bool = True,
) -> Iterator[RequestInput]:
    """Yield validated requests; raise InputError at the first bad line. Without
    `keep_documents` a line is only validated, and its request may hold no documents (its
    `document_count` counts them)."""
    seen: dict[str, int] = {}
    position = 0
    for line_no, text, value in _parsed_lines(lines, REQUEST_TEXT_FIELDS, limits.max_line_bytes):
        try:
            request = parse_request(
                value,
                line_no=line_no,
                position=position,
                default_model=default_model,
                default_top_n=default_top_n,
                limits=limits,
                keep_documents=keep_documents,
            )
        except errors.InputError:
            # Whatever else is wrong with a line nested this deep, its depth is the error.
            if _nests_deeper_than(text, constants.MAX_JSON_DEPTH):
                raise _too_deep(line_no) from None
            raise
        first = seen.setdefault(request.custom_id, line_no)
        if first != line_no:
            raise errors.InputError(
                f"duplicate custom_id '{shown(request.custom_id)}' (first on line {first})",
                line=line_no,
                field="custom_id",
            )
        position += 1
        yield request
    if position == 0:
        raise errors.InputError("the file holds no requests")


def iter_corpus(
    lines: Iterable[bytes | str], *, limits: Limits = DEFAULT_LIMITS
) -> Iterator[DocumentInput]:
    """Yield the documents of a corpus file (one per line, with an optional "id")."""
    count = 0
    max_chars = limits.max_document_chars
    for line_no, text, value in _parsed_lines(lines, CORPUS_TEXT_FIELDS, limits.max_line_bytes):
        try:
            document = parse_document(
                value, line_no=line_no, where="", allow_id=True, max_chars=max_chars
            )
        except errors.InputError:
            if _nests_deeper_than(text, constants.MAX_JSON_DEPTH):
                raise _too_deep(line_no) from None
            raise
        yield document
        count += 1
    if count == 0:
        raise errors.InputError("the corpus file holds no documents")
