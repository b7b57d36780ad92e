"""The score cache: a pointwise model's score of a (query, document) pair, paid for once.

A pair is keyed by a 16-byte BLAKE2b hash of the model, the query and the document's
stored JSON text, so re-running an unchanged corpus sends nothing and a changed document
is simply a new key. Listwise models are never cached: their scores depend on the other
documents of the call. A hit saves the pair's share of the tokens its call was billed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from worker import catalog
from worker.domain import CachedScore, RequestWork

KEY_BYTES = 16


def pair_key(model: str, query: str, document_json: str) -> bytes:
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (model, query, document_json):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.digest()


def applies(work: RequestWork) -> bool:
    return work.use_cache and catalog.model_spec(work.model).pointwise


def keys_of(work: RequestWork) -> list[bytes]:
    return [pair_key(work.model, work.query, doc) for doc in work.documents_json]


def with_hits(
    work: RequestWork, keys: Sequence[bytes], found: dict[bytes, CachedScore]
) -> RequestWork:
    """The work with its keys and the scores already known, by document position."""
    cached = {position: found[key] for position, key in enumerate(keys) if key in found}
    return dataclasses.replace(work, cache_keys=list(keys), cached=cached)
