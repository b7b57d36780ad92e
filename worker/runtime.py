"""Per-process resources: the asyncio engine that talks to the upstream.

Celery runs tasks in threads; the engine runs one event loop in its own thread with one
pooled HTTP client and one Redis connection pool, and tasks hand it requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from worker import constants
from worker.db import repository
from worker.db.models import RequestStatus
from worker.db.session import get_sessionmaker, in_transaction
from worker.domain import RequestOutcome, RequestWork
from worker.engine import Reranker
from worker.event_loop import new_event_loop
from worker.redis_clients import async_redis, redis_url
from worker.settings import Settings
from worker.upstream.budget import JobBudgets
from worker.upstream.client import RerankClient
from worker.upstream.limits import KeyPool
from worker.upstream.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")


def lease_s(settings: Settings) -> float:
    return settings.call_timeout_s + constants.SLOT_LEASE_MARGIN_S


class SqlEpochWitness:
    """The newest Redis epoch, kept in the database (see upstream/limits.py)."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url

    def last_seen(self) -> str | None:
        """One try, not in_transaction's retries: a slot waits on this read, and without it
        the pool only misses the quarantine of a Redis emptied before this process started."""
        try:
            with get_sessionmaker(self._url).begin() as session:
                return repository.last_redis_epoch(session)
        except SQLAlchemyError:
            log.warning("action=redis_epoch_unread", exc_info=True)
            return None

    def saw(self, epoch: str) -> None:
        threading.Thread(target=self._save, args=(epoch,), name="rerank-epoch", daemon=True).start()

    def _save(self, epoch: str) -> None:
        try:
            in_transaction(self._url, functools.partial(repository.save_redis_epoch, epoch=epoch))
        except SQLAlchemyError:
            log.warning("action=redis_epoch_unsaved epoch=%s", epoch, exc_info=True)


class Engine:
    """An event loop thread owning the HTTP client, the key pool and the reranker."""

    def __init__(self, settings: Settings) -> None:
        settings.require_keys()
        self._settings = settings
        self._url = redis_url(settings)
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rerank-engine", daemon=True
        )
        self._running: set[asyncio.Task[RequestOutcome]] = set()
        self._thread.start()
        self.reranker: Reranker = self._call(self._build())

    async def _build(self) -> Reranker:
        settings = self._settings
        self._redis = async_redis(self._url)
        self._client = RerankClient(
            settings.api_base, timeout_s=settings.call_timeout_s, keys=settings.keys
        )
        self.pool = KeyPool(
            self._redis,
            settings.keys,
            lease_s=lease_s(settings),
            window_s=settings.rate_window_s,
            local_slots=settings.slots_per_process,
            witness=SqlEpochWitness(settings.sqlalchemy_url()),
        )
        policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            base_s=settings.backoff_base_s,
            cap_s=settings.backoff_cap_s,
        )
        return Reranker(
            self._client,
            self.pool,
            policy,
            max_documents_per_call=settings.max_documents_per_call,
            budgets=JobBudgets(self._redis),
        )

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(
        self, work: Sequence[RequestWork], on_done: Callable[[RequestWork, RequestOutcome], None]
    ) -> None:
        """Start the requests with one wake-up of the loop for them all; `on_done` gets each
        request and its outcome on the loop's thread. A bug in a request still ends it, as a
        failed outcome."""
        self._loop.call_soon_threadsafe(self._start, work, on_done)

    def _start(
        self, work: Sequence[RequestWork], on_done: Callable[[RequestWork, RequestOutcome], None]
    ) -> None:
        for item in work:
            task = self._loop.create_task(self.reranker.run(item))
            self._running.add(task)  # the loop itself keeps only a weak reference
            task.add_done_callback(functools.partial(self._finished, item, on_done))

    def _finished(
        self,
        work: RequestWork,
        on_done: Callable[[RequestWork, RequestOutcome], None],
        task: asyncio.Task[RequestOutcome],
    ) -> None:
        self._running.discard(task)
        try:
            outcome = task.result()
        except (Exception, asyncio.CancelledError) as exc:
            log.exception("action=request_crashed request=%s", work.request_id)
            outcome = RequestOutcome(
                request_id=work.request_id,
                job_id=work.job_id,
                status=RequestStatus.FAILED,
                delivery=work.delivery,
                error_type="internal_error",
                error_message=f"{type(exc).__name__}: {exc}",
            )
        on_done(work, outcome)

    def close(self) -> None:
        async def _close() -> None:
            await self.pool.aclose()
            await self._client.aclose()
            await self._redis.aclose()

        self._call(_close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
