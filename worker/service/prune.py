"""Retention: delete finished jobs older than N days, and score-cache entries past an age.

Nightly reprocessing adds a corpus a night; without this the tables grow for ever. Jobs go
in short transactions of at most REQUESTS_PER_TRANSACTION requests (and
DOCUMENTS_PER_TRANSACTION documents), so no lock is held long enough to stall the workers.
Each transaction first adds its calls to the daily usage rollup, then deletes them with
their requests and documents: `usage` reads the rollup beside the live calls, so its totals
are the same before and after, at every moment in between.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session

from worker import errors
from worker.db import repository
from worker.db.base import utcnow
from worker.service.scope import run_in_transaction
from worker.settings import Settings, get_settings

REQUESTS_PER_TRANSACTION = 1000
DOCUMENTS_PER_TRANSACTION = 50_000
CACHE_ENTRIES_PER_TRANSACTION = 10_000


@dataclass
class PruneResult:
    jobs: int = 0
    requests: int = 0
    documents: int = 0
    calls: int = 0
    cache_entries: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cutoff(days: float, option: str) -> dt.datetime:
    if not days >= 0:
        raise errors.InputError("must be a number of days >= 0", field=option)
    return utcnow() - dt.timedelta(days=days)


def prune(
    older_than_days: float,
    cache_older_than_days: float | None = None,
    settings: Settings | None = None,
) -> PruneResult:
    settings = settings or get_settings()
    jobs_before = _cutoff(older_than_days, "older_than")
    cache_before = (
        None
        if cache_older_than_days is None
        else _cutoff(cache_older_than_days, "cache_older_than")
    )
    result = PruneResult()
    old_jobs = run_in_transaction(
        functools.partial(repository.finished_jobs_before, before=jobs_before), settings
    )
    for job_id, tenant_id in old_jobs:
        _prune_job(job_id, tenant_id, settings, result)
    if cache_before is not None:
        delete = functools.partial(
            repository.delete_cache_entries_before,
            before=cache_before,
            limit=CACHE_ENTRIES_PER_TRANSACTION,
        )
        while deleted := run_in_transaction(delete, settings):
            result.cache_entries += deleted
    return result


def _prune_job(job_id: str, tenant_id: int | None, settings: Settings, result: PruneResult) -> None:
    while True:
        batch = run_in_transaction(
            functools.partial(
                repository.request_batch,
                job_id=job_id,
                limit=REQUESTS_PER_TRANSACTION,
                max_documents=DOCUMENTS_PER_TRANSACTION,
            ),
            settings,
        )
        if not batch:
            break
        # A request larger than a transaction's share (a corpus) loses its documents first,
        # in slices of their positions.
        for request_id, documents in batch:
            if documents > DOCUMENTS_PER_TRANSACTION:
                for start in range(0, documents, DOCUMENTS_PER_TRANSACTION):
                    result.documents += run_in_transaction(
                        functools.partial(
                            repository.delete_document_range,
                            request_id=request_id,
                            stop=start + DOCUMENTS_PER_TRANSACTION,
                        ),
                        settings,
                    )
        ids = [request_id for request_id, _ in batch]
        deleted = run_in_transaction(
            functools.partial(_delete_requests, ids=ids, tenant_id=tenant_id), settings
        )
        result.requests += deleted.requests
        result.documents += deleted.documents
        result.calls += deleted.calls
    run_in_transaction(functools.partial(repository.delete_job, job_id=job_id), settings)
    result.jobs += 1


def _delete_requests(
    session: Session, ids: list[int], tenant_id: int | None
) -> repository.DeletedRows:
    repository.roll_up_calls(session, ids, tenant_id)
    return repository.delete_requests(session, ids)
