"""How many worker processes `rerank-worker worker` runs by default, and their node names."""

from __future__ import annotations

import pytest

from worker import processes
from worker.settings import Settings


def settings_with(keys: str) -> Settings:
    return Settings(api_keys=keys, api_base="http://standin.test")


@pytest.mark.parametrize(
    ("keys", "cpus", "expected"),
    [
        ("a=x@3", 8, 1),  # few slots: one process, whatever the cores
        ("a=x@8,b=y@8,c=z@8,d=w@8", 8, 1),  # 32 slots (the benchmark): still one
        ("a=x@8,b=y@8,c=z@8,d=w@8,e=v@1", 8, 2),  # 33 slots: two
        ("a=x@64,b=y@64", 2, 2),  # never more processes than cores
        ("a=x@64,b=y@64", 1, 1),
    ],
)
def test_one_process_per_32_slots_at_most_one_per_core(
    keys: str, cpus: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "usable_cpus", lambda: cpus)
    assert processes.default_processes(settings_with(keys)) == expected


def test_each_process_gets_a_numbered_node_name() -> None:
    assert processes.node_name(None, 1) == "rerank-1@%h"
    assert processes.node_name("bulk@host-a", 2) == "bulk-2@host-a"
    assert processes.node_name("bulk", 3) == "bulk-3"


def test_a_process_share_caps_its_slots_and_its_default_threads() -> None:
    shared = settings_with("a=x@8,b=y@8,c=z@8,d=w@8").model_copy(update={"process_slots": 16})
    assert shared.slots_per_process == 16
    assert settings_with("a=x@8,b=y@8,c=z@8,d=w@8").slots_per_process == 32
    assert settings_with("a=x@2").model_copy(update={"process_slots": 16}).slots_per_process == 2
    whole = settings_with("a=x@100,b=y@100")
    assert whole.default_worker_concurrency() == 14  # 2 x ceil(200 / 32)
    halved = whole.model_copy(update={"process_slots": 100})
    assert halved.default_worker_concurrency() == 8  # 2 x ceil(100 / 32)
