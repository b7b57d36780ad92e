"""Run requests: a worker claims them in SQL, with their cached scores, for its pipeline."""

from __future__ import annotations

import functools
import logging

from sqlalchemy.orm import Session

from worker import cache, constants, metrics
from worker.db import repository
from worker.domain import RequestWork
from worker.service import ending
from worker.service.scope import run_in_transaction
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def run_requests(request_ids: list[int]) -> int:
    """Claim the requests in SQL and hand them to this process's pipeline."""
    from worker.pipeline import get_pipeline  # the engine and HTTP stack: workers only

    settings = get_settings()
    work, poison = run_in_transaction(functools.partial(_claim, ids=request_ids, settings=settings))
    if poison:
        log.error("action=poison_request requests=%d ids=%s", len(poison), _joined(poison))
        metrics.POISON_REQUESTS.inc(len(poison))
        metrics.REQUESTS_FINISHED.labels("failed").inc(len(poison))
    if work:
        get_pipeline(settings).run(work)
    return len(work)


def _joined(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def _claim(
    session: Session, ids: list[int], settings: Settings
) -> tuple[list[RequestWork], list[int]]:
    """One transaction per task: claim, end the jobs of poison requests, look up the cache.
    Returns the work and the ids failed as poison."""
    work, poison = repository.claim_requests(
        session, ids, lease_s=settings.request_lease_s, max_deliveries=constants.MAX_DELIVERIES
    )
    if poison:
        ending.complete_jobs_of_requests(session, poison)
    return _with_cache_hits(session, work), poison


def _with_cache_hits(session: Session, work: list[RequestWork]) -> list[RequestWork]:
    """Look up the cacheable requests' pairs, all in one query."""
    keys = {w.request_id: cache.keys_of(w) for w in work if cache.applies(w)}
    if not keys:
        return work
    every_key = [key for request_keys in keys.values() for key in request_keys]
    found = repository.cached_scores(session, every_key)
    return [
        cache.with_hits(w, keys[w.request_id], found) if w.request_id in keys else w for w in work
    ]
