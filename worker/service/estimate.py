"""Estimate a file's job before a cent is spent: its requests, upstream calls, tokens, cost,
pairs the score cache already holds, and how long it would take. Stores nothing.

The file is read with submit's own parser, so what fails to submit fails here the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from sqlalchemy.orm import Session

from worker import cache, catalog, constants, ingest
from worker.db import repository
from worker.redis_clients import redis_url, sync_redis
from worker.service.scope import sessions
from worker.service.submit import REQUEST_BATCH, JobOptions, input_limits
from worker.settings import ApiKey, Settings, get_settings
from worker.upstream import token_estimate

# Documents looked up in the score cache per query.
LOOKUP_BATCH = 5000
# Recent successful calls whose latency makes the assumed latency of a call.
LATENCY_SAMPLE = 1000


@dataclass
class Estimate:
    requests: int = 0
    calls: int = 0
    estimated_tokens: int = 0
    estimated_cost: float = 0.0
    cached_pairs: int = 0
    estimated_seconds: float = 0.0
    # How the figures were reached, for a reader to judge them.
    search_units: int = 0
    unpriced_models: list[str] = field(default_factory=list)
    call_latency_s: float = 0.0
    latency_from: str = "setting"
    bound_by: str = "concurrency"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    """Per model: what the calls of the file would send."""

    calls: int = 0
    tokens: int = 0
    search_units: int = 0


def estimate_job(
    lines: Iterable[bytes],
    *,
    options: JobOptions | None = None,
    settings: Settings | None = None,
) -> Estimate:
    settings = settings or get_settings()
    options = options or JobOptions()
    limits = input_limits(settings)
    options.check(limits, settings)
    model = options.model or settings.default_model
    result = Estimate()
    tallies: dict[str, _Tally] = {}
    with sessions(settings)() as session:
        if options.query is not None:
            corpus = ingest.RequestInput(0, "corpus", options.query, model, options.top_n, False)
            _count_corpus(
                session,
                corpus,
                ingest.iter_corpus(lines, limits=limits),
                options,
                settings,
                result,
                tallies,
            )
        else:
            requests = ingest.iter_requests(
                lines, default_model=model, default_top_n=options.top_n, limits=limits
            )
            for batch in _batches(requests, REQUEST_BATCH):
                _count_requests(session, batch, options, settings, result, tallies)
        prices = repository.model_prices(session)
        latency_s, result.latency_from = _call_latency_s(session, settings)
        session.rollback()
    ratios = _learnt_ratios(settings, tallies)
    for name, tally in sorted(tallies.items()):
        tally.tokens = token_estimate.expected_tokens(tally.tokens, ratios.get(name))
        result.calls += tally.calls
        result.estimated_tokens += tally.tokens
        result.search_units += tally.search_units
        cost = repository.price_of(prices, name, tally.tokens, tally.search_units)
        if cost is None:
            result.unpriced_models.append(name)
        else:
            result.estimated_cost += cost
    result.estimated_cost = round(result.estimated_cost, 9)
    result.call_latency_s = latency_s
    result.estimated_seconds, result.bound_by = duration_s(
        result.calls,
        result.estimated_tokens,
        latency_s,
        settings.keys,
        settings.max_concurrency_per_key,
        settings.rate_window_s,
    )
    return result


def _batches(
    requests: Iterator[ingest.RequestInput], size: int
) -> Iterator[list[ingest.RequestInput]]:
    batch: list[ingest.RequestInput] = []
    for request in requests:
        batch.append(request)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _uses_cache(options: JobOptions, model: str) -> bool:
    return options.use_cache and catalog.model_spec(model).pointwise


def _cached(session: Session, model: str, query: str, documents: Sequence[str]) -> list[bool]:
    """Whether each document's pair is in the score cache (looked up, nothing stored)."""
    keys = [cache.pair_key(model, query, document) for document in documents]
    found = repository.cached_scores(session, keys)
    return [key in found for key in keys]


def _count_requests(
    session: Session,
    batch: list[ingest.RequestInput],
    options: JobOptions,
    settings: Settings,
    result: Estimate,
    tallies: dict[str, _Tally],
) -> None:
    for request in batch:
        documents = [d.content for d in request.documents]
        uncached = documents
        if _uses_cache(options, request.model):
            hits = _cached(session, request.model, request.query, documents)
            result.cached_pairs += sum(hits)
            uncached = [d for d, hit in zip(documents, hits, strict=True) if not hit]
        result.requests += 1
        _add_calls(tallies, request.model, request.query, uncached, settings)


def _count_corpus(
    session: Session,
    corpus: ingest.RequestInput,
    documents: Iterator[ingest.DocumentInput],
    options: JobOptions,
    settings: Settings,
    result: Estimate,
    tallies: dict[str, _Tally],
) -> None:
    """One request whose documents stream by: counted in chunks, in constant memory."""
    uncached = 0
    tally = tallies.setdefault(corpus.model, _Tally())
    chunk: list[str] = []

    def count(chunk: list[str]) -> int:
        kept = chunk
        if _uses_cache(options, corpus.model):
            hits = _cached(session, corpus.model, corpus.query, chunk)
            result.cached_pairs += sum(hits)
            kept = [d for d, hit in zip(chunk, hits, strict=True) if not hit]
        tally.tokens += token_estimate.estimate_tokens(corpus.model, kept, corpus.query)
        return len(kept)

    for document in documents:
        chunk.append(document.content)
        if len(chunk) >= LOOKUP_BATCH:
            uncached += count(chunk)
            chunk = []
    if chunk:
        uncached += count(chunk)
    result.requests = 1
    per_call = catalog.max_documents_per_call(corpus.model, settings.max_documents_per_call)
    sizes = _call_sizes(uncached, per_call)
    tally.calls += len(sizes)
    tally.search_units += sum(token_estimate.estimate_search_units(size) for size in sizes)


def _call_sizes(documents: int, per_call: int) -> list[int]:
    return [min(per_call, documents - start) for start in range(0, documents, per_call)]


def _add_calls(
    tallies: dict[str, _Tally], model: str, query: str, documents: list[str], settings: Settings
) -> None:
    tally = tallies.setdefault(model, _Tally())
    per_call = catalog.max_documents_per_call(model, settings.max_documents_per_call)
    sizes = _call_sizes(len(documents), per_call)
    tally.calls += len(sizes)
    tally.tokens += token_estimate.estimate_tokens(model, documents, query)
    tally.search_units += sum(token_estimate.estimate_search_units(size) for size in sizes)


def _call_latency_s(session: Session, settings: Settings) -> tuple[float, str]:
    """The median latency of recent successful calls, or the setting when there are none."""
    latencies = repository.recent_latencies_ms(session, LATENCY_SAMPLE)
    if latencies:
        return statistics.median(latencies) / 1000, "measured"
    return settings.estimate_call_latency_s, "setting"


def _learnt_ratios(settings: Settings, tallies: dict[str, _Tally]) -> dict[str, float]:
    """Billed / estimated tokens per model, as the workers learnt them from answers' usage
    (shared in Redis); an estimate made where Redis is out of reach uses the plain guess."""
    try:
        client = sync_redis(redis_url(settings))
        found = {model: token_estimate.learnt_ratio(client, model) for model in tallies}
    except redis.exceptions.RedisError:
        return {}
    return {model: ratio for model, ratio in found.items() if ratio is not None}


def duration_s(
    calls: int,
    estimated_tokens: int,
    latency_s: float,
    keys: Sequence[ApiKey],
    default_concurrency: int,
    window_s: float = constants.RATE_WINDOW_S,
) -> tuple[float, str]:
    """The longest of: the calls at the keys' concurrency, at their RPM, at their TPM.

    A per-minute limit lets R calls go at once, then the next R a minute later.
    """
    if not calls:
        return 0.0, "concurrency"
    concurrency = sum(k.max_concurrency for k in keys) or default_concurrency
    bounds = {"concurrency": math.ceil(calls / concurrency) * latency_s}
    for limit, amount in (("rpm", calls), ("tpm", estimated_tokens)):
        # Every key must have the limit; a key without it leaves the keys unbounded by it.
        per_minute = [_limit_of(key, limit) for key in keys]
        if per_minute and all(per_minute):
            windows = math.ceil(amount / sum(per_minute)) - 1
            bounds[limit] = max(0, windows) * window_s + latency_s
    bound_by = max(bounds, key=lambda name: bounds[name])
    return round(bounds[bound_by], 3), bound_by


def _limit_of(key: object, name: str) -> int:
    """A key's per-minute limit (0: none). Keys may not have the attribute at all."""
    value = getattr(key, name, None)
    return value if isinstance(value, int) and value > 0 else 0
