"""The in-process slot queue: interactive waiters first, arrival order within a priority, and
no permit lost or doubled when a waiter is cancelled. Pure asyncio, no timing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from worker.upstream.limits import PrioritySemaphore


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(10):
            return await main()

    return asyncio.run(bounded())


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


class Takers:
    """Tasks that take one permit each, note their name in `order`, and hold it until told."""

    def __init__(self, semaphore: PrioritySemaphore) -> None:
        self.semaphore = semaphore
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, name: str, interactive: bool) -> None:
        async def take() -> None:
            await self.semaphore.acquire(interactive)
            self.order.append(name)

        self.tasks[name] = asyncio.create_task(take())
        await settle()

    async def release(self, times: int = 1) -> None:
        for _ in range(times):
            self.semaphore.release()
            await settle()


def test_a_free_permit_is_taken_at_once_by_either_priority() -> None:
    async def main() -> None:
        semaphore = PrioritySemaphore(2)
        await asyncio.wait_for(semaphore.acquire(interactive=False), 1)
        await asyncio.wait_for(semaphore.acquire(interactive=True), 1)
        takers = Takers(semaphore)
        await takers.start("third", interactive=True)
        assert takers.order == []
        assert semaphore.waiting(interactive=True) == 1

    run(main)


def test_interactive_waiters_go_before_bulk_ones_in_arrival_order_within_each() -> None:
    async def main() -> list[str]:
        semaphore = PrioritySemaphore(1)
        await semaphore.acquire(interactive=False)
        takers = Takers(semaphore)
        for name, interactive in [
            ("bulk-1", False),
            ("bulk-2", False),
            ("interactive-1", True),
            ("bulk-3", False),
            ("interactive-2", True),
        ]:
            await takers.start(name, interactive)
        assert takers.order == []
        for _ in range(5):
            await takers.release()
        return takers.order

    assert run(main) == ["interactive-1", "interactive-2", "bulk-1", "bulk-2", "bulk-3"]


def test_a_newcomer_does_not_overtake_a_waiter_that_was_handed_the_permit() -> None:
    async def main() -> None:
        semaphore = PrioritySemaphore(1)
        await semaphore.acquire(interactive=False)
        takers = Takers(semaphore)
        await takers.start("waiting", interactive=False)
        semaphore.release()  # handed over; "waiting" has not run yet
        newcomer = asyncio.create_task(semaphore.acquire(interactive=True))
        await settle()
        assert takers.order == ["waiting"]
        assert not newcomer.done()
        await takers.release()
        assert newcomer.done()

    run(main)


def test_a_waiter_cancelled_while_waiting_leaves_the_queue_and_takes_no_permit() -> None:
    async def main() -> None:
        semaphore = PrioritySemaphore(1)
        await semaphore.acquire(interactive=False)
        takers = Takers(semaphore)
        await takers.start("cancelled", interactive=True)
        await takers.start("bulk", interactive=False)
        takers.tasks["cancelled"].cancel()
        await settle()
        assert semaphore.waiting(interactive=True) == 0
        await takers.release()
        assert takers.order == ["bulk"]
        # Exactly one permit in circulation: held by "bulk", none free.
        await takers.start("after", interactive=True)
        assert takers.order == ["bulk"]
        await takers.release()
        assert takers.order == ["bulk", "after"]

    run(main)


def test_a_waiter_cancelled_just_after_it_was_handed_the_permit_passes_it_on() -> None:
    async def main() -> None:
        semaphore = PrioritySemaphore(1)
        await semaphore.acquire(interactive=False)
        takers = Takers(semaphore)
        await takers.start("handed", interactive=True)
        await takers.start("next", interactive=False)
        semaphore.release()  # handed to "handed", which is cancelled before it runs
        takers.tasks["handed"].cancel()
        await settle()
        with pytest.raises(asyncio.CancelledError):
            await takers.tasks["handed"]
        assert takers.order == ["next"]
        # And the count is intact: one release frees one permit for a newcomer.
        await takers.release()
        await asyncio.wait_for(semaphore.acquire(interactive=False), 1)

    run(main)


def test_a_cancelled_waiter_that_a_release_already_skipped_leaves_no_trace() -> None:
    async def main() -> None:
        semaphore = PrioritySemaphore(1)
        await semaphore.acquire(interactive=False)
        takers = Takers(semaphore)
        await takers.start("cancelled", interactive=False)
        takers.tasks["cancelled"].cancel()
        semaphore.release()  # runs before the cancelled task does: the permit goes free
        await settle()
        assert takers.tasks["cancelled"].cancelled()
        assert semaphore.waiting(interactive=False) == 0
        await asyncio.wait_for(semaphore.acquire(interactive=True), 1)
        await takers.start("blocked", interactive=True)
        assert takers.order == []

    run(main)
