"""SqlEpochWitness: the newest Redis epoch kept in SQL, read back by any process."""

from __future__ import annotations

from conftest import wait_for

from worker.runtime import SqlEpochWitness


def test_the_newest_epoch_seen_is_kept_and_replaced(database_url: str) -> None:
    first, second = SqlEpochWitness(database_url), SqlEpochWitness(database_url)
    assert first.last_seen() is None
    first.saw("epoch-1")
    wait_for(lambda: second.last_seen() == "epoch-1", 10, "the first epoch to be kept")
    second.saw("epoch-2")
    wait_for(lambda: first.last_seen() == "epoch-2", 10, "the newer epoch to replace it")


def test_an_unreachable_database_reads_as_no_epoch_and_does_not_raise() -> None:
    witness = SqlEpochWitness("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    assert witness.last_seen() is None
