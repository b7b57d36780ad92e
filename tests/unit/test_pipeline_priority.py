"""The pipeline's side of interactive before bulk: an interactive task never waits for room,
and when every task thread is held by a bulk task waiting for room while an interactive
message is queued, one of them is let go (so Celery can fetch that message into its thread).

The engine is a stand-in whose requests finish when the test says; the recorder writes their
outcomes to a real (empty) SQLite database.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_for
from sqlalchemy.orm import Session

from worker import constants
from worker import pipeline as pipeline_module
from worker.domain import RequestOutcome, RequestWork
from worker.pipeline import Pipeline
from worker.settings import Settings

_ids = itertools.count(1)


class HeldEngine:
    """Accepts requests and finishes them only when told to."""

    def __init__(self) -> None:
        self.started: dict[int, tuple[RequestWork, Callable[[RequestWork, RequestOutcome], None]]]
        self.started = {}
        self.finished: set[int] = set()

    def start(
        self, work: list[RequestWork], on_done: Callable[[RequestWork, RequestOutcome], None]
    ) -> None:
        self.started.update((w.request_id, (w, on_done)) for w in work)

    def finish(self, *works: RequestWork, status: str = "succeeded") -> None:
        for work in works:
            if work.request_id not in self.finished:
                self.finished.add(work.request_id)
                _, on_done = self.started[work.request_id]
                on_done(
                    work,
                    RequestOutcome(
                        work.request_id, work.job_id, status=status, delivery=work.delivery
                    ),
                )

    def finish_all(self) -> None:
        self.finish(*(w for w, _ in self.started.values()), status="failed")

    def close(self) -> None:
        pass


def work(priority: str) -> RequestWork:
    return RequestWork(
        request_id=next(_ids),
        job_id="j",
        query="q",
        model="jina-reranker-m0",
        top_n=None,
        return_documents=False,
        documents_json=['"d"'],
        delivery=1,
        priority=priority,
    )


class Task(threading.Thread):
    """A Celery task thread running `pipeline.run`."""

    def __init__(self, pipeline: Pipeline, works: list[RequestWork]) -> None:
        super().__init__(target=pipeline.run, args=(works,), daemon=True)
        self.start()


@pytest.fixture
def make_pipeline(sqlite_url: str) -> Iterator[Callable[..., tuple[Pipeline, HeldEngine]]]:
    made: list[tuple[Pipeline, HeldEngine]] = []

    def build(max_backlog: int, **lookout: Any) -> tuple[Pipeline, HeldEngine]:
        engine = HeldEngine()
        pipeline = Pipeline(
            engine,  # type: ignore[arg-type]
            Settings(database_url=sqlite_url),
            max_backlog=max_backlog,
            **lookout,
        )
        made.append((pipeline, engine))
        return pipeline, engine

    yield build
    for pipeline, engine in made:
        engine.finish_all()
        pipeline.close(timeout_s=10)


def test_an_interactive_task_returns_at_once_while_a_bulk_one_waits_for_room(
    make_pipeline: Callable[..., tuple[Pipeline, HeldEngine]],
) -> None:
    pipeline, engine = make_pipeline(max_backlog=2)
    bulk = [work(constants.QUEUE_BULK), work(constants.QUEUE_BULK)]
    bulk_task = Task(pipeline, bulk)
    wait_for(lambda: len(engine.started) == 2, 10, "the bulk requests to be submitted")

    interactive = work(constants.QUEUE_INTERACTIVE)
    interactive_task = Task(pipeline, [interactive])
    interactive_task.join(timeout=10)
    assert not interactive_task.is_alive(), "an interactive task waited for room"
    assert bulk_task.is_alive()

    # Its request counts in the backlog: one bulk request done still leaves no room.
    engine.finish(bulk[0])
    wait_for(lambda: bulk[0].request_id not in pipeline._running, 10, "the first to be recorded")
    assert bulk_task.is_alive()
    engine.finish(interactive)
    bulk_task.join(timeout=10)
    assert not bulk_task.is_alive(), "the bulk task did not return once there was room"


def test_when_every_task_thread_waits_for_room_one_makes_way_for_a_queued_interactive(
    make_pipeline: Callable[..., tuple[Pipeline, HeldEngine]],
) -> None:
    queued = threading.Event()
    looks: list[bool] = []

    def interactive_queued() -> bool:
        looks.append(queued.is_set())
        return looks[-1]

    pipeline, _ = make_pipeline(
        max_backlog=1, interactive_queued=interactive_queued, task_threads=2
    )
    first = Task(pipeline, [work(constants.QUEUE_BULK)])
    second = Task(pipeline, [work(constants.QUEUE_BULK)])
    wait_for(lambda: len(looks) >= 3, 10, "the lookout to look while both wait")
    assert first.is_alive() and second.is_alive()

    queued.set()
    wait_for(lambda: not (first.is_alive() and second.is_alive()), 10, "one to make way")
    assert first.is_alive() != second.is_alive(), "both made way for one message"


def test_outcomes_wait_for_the_interval_but_an_interactive_one_is_written_at_once(
    make_pipeline: Callable[..., tuple[Pipeline, HeldEngine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "RECORD_INTERVAL_S", 30.0)
    batches: list[list[int]] = []
    real_record = pipeline_module.record

    def record(session: Session, outcomes: list[RequestOutcome], **kwargs: Any) -> None:
        batches.append([o.request_id for o in outcomes])
        real_record(session, outcomes, **kwargs)

    monkeypatch.setattr(pipeline_module, "record", record)
    pipeline, engine = make_pipeline(max_backlog=10)
    first, second = work(constants.QUEUE_BULK), work(constants.QUEUE_BULK)
    pipeline.run([first, second])
    engine.finish(first, second)
    assert batches == [], "bulk outcomes were written before their interval was over"

    interactive = work(constants.QUEUE_INTERACTIVE)
    pipeline.run([interactive])
    engine.finish(interactive)
    wait_for(lambda: batches, 5, "the interactive outcome to be written")
    assert batches == [[first.request_id, second.request_id, interactive.request_id]]

    # The recorder now waits up to 30 s for the next outcome: give it one, so the fixture's
    # close does not wait that long.
    monkeypatch.setattr(constants, "RECORD_INTERVAL_S", 0.05)
    last = work(constants.QUEUE_INTERACTIVE)
    pipeline.run([last])
    engine.finish(last)
