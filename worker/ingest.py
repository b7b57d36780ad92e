"""Parse and validate requests files, line by line, without holding the file in memory.

Two forms (see CONTRACT.md): a requests file (one request per line) and a corpus file
(one document per line, all ranked against one `--query`). Every error names the
1-based line number and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker import catalog, errors

REQUEST_FIELDS = frozenset(
    {"custom_id", "query", "documents", "top_n", "model", "return_documents"}
)
MAX_CUSTOM_ID_LENGTH = 200


@dataclass
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


def _json_line(raw: bytes | str, line_no: int) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise errors.InputError(f"not valid UTF-8 ({exc.reason})", line=line_no) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InputError(
            f"not valid JSON ({exc.msg}, column {exc.colno})", line=line_no
        ) from exc


# One encoder for every document: json.dumps with options builds a new one per call.
_encode_string = json.JSONEncoder(ensure_ascii=False).encode
DOCUMENT_KINDS = ("text", "image")


def parse_document(
    value: Any, *, line_no: int, where: str, allow_id: bool = False
) -> DocumentInput:
    """A string, {"text": str} or {"image": URL or base64}; content kept exactly as given
    (compact JSON, non-ASCII unescaped)."""
    if isinstance(value, str):
        if not value.strip():
            raise errors.InputError("document text is empty", line=line_no, field=where or None)
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
        sub = f"{where}.{kind}" if where else kind
        raise errors.InputError("must be a non-empty string", line=line_no, field=sub)
    return DocumentInput(
        f'{{"{kind}":{_encode_string(inner)}}}', is_image=kind == "image", doc_id=doc_id
    )


def _document_id(raw_id: Any, line_no: int, where: str) -> str:
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise errors.InputError("must be a string or an integer", line=line_no, field=f"{where}id")
    return str(raw_id)


def _document_kind(body: dict[str, Any], line_no: int, where: str, allow_id: bool) -> str:
    """'text' or 'image', whichever the document object holds; any other field is an error."""
    extra = [k for k in body if k not in DOCUMENT_KINDS and not (allow_id and k == "id")]
    if extra:
        name = min(extra)
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
    return value


def parse_request(
    obj: Any, *, line_no: int, position: int, default_model: str, default_top_n: int | None
) -> RequestInput:
    if not isinstance(obj, dict):
        raise errors.InputError(f"expected a JSON object, got {type(obj).__name__}", line=line_no)
    unknown = sorted(set(obj) - REQUEST_FIELDS)
    if unknown:
        raise errors.InputError(f"unknown field '{unknown[0]}'", line=line_no, field=unknown[0])
    custom_id = obj.get("custom_id", f"line-{line_no}")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        raise errors.InputError(
            f"must be a non-empty string of at most {MAX_CUSTOM_ID_LENGTH} characters",
            line=line_no,
            field="custom_id",
        )
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise errors.InputError("required, a non-empty string", line=line_no, field="query")
    raw_documents = obj.get("documents")
    if not isinstance(raw_documents, list) or not raw_documents:
        raise errors.InputError("required, a non-empty list", line=line_no, field="documents")
    documents = [
        parse_document(doc, line_no=line_no, where=f"documents[{i}]")
        for i, doc in enumerate(raw_documents)
    ]
    model = obj.get("model", default_model)
    if not isinstance(model, str) or not model.strip():
        raise errors.InputError("must be a non-empty string", line=line_no, field="model")
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
    )


def iter_requests(
    lines: Iterable[bytes | str], *, default_model: str, default_top_n: int | None = None
) -> Iterator[RequestInput]:
    """Yield validated requests; raise InputError at the first bad line."""
    seen: dict[str, int] = {}
    position = 0
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        request = parse_request(
            _json_line(raw, line_no),
            line_no=line_no,
            position=position,
            default_model=default_model,
            default_top_n=default_top_n,
        )
        first = seen.setdefault(request.custom_id, line_no)
        if first != line_no:
            raise errors.InputError(
                f"duplicate custom_id '{request.custom_id}' (first on line {first})",
                line=line_no,
                field="custom_id",
            )
        position += 1
        yield request
    if position == 0:
        raise errors.InputError("the file holds no requests")


def iter_corpus(lines: Iterable[bytes | str]) -> Iterator[DocumentInput]:
    """Yield the documents of a corpus file (one per line, with an optional "id")."""
    count = 0
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        yield parse_document(_json_line(raw, line_no), line_no=line_no, where="", allow_id=True)
        count += 1
    if count == 0:
        raise errors.InputError("the corpus file holds no documents")
