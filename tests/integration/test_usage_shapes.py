"""Every usage shape of 302.AI's rerank models, answered by the stand-in, recorded by real
workers: tokens, search units, and calls billed without a figure flagged, never 0 tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from conftest import Env, api_keys
from jobs_support import results_of, submit, wait_ok, write_jsonl

from worker.standin import ThreadedStandin
from worker.standin.scoring import rank

SHAPED_MODELS = {
    "jina-reranker-m0": "usage",
    "bge-reranker-v2-m3": "meta_tokens",
    "bce-reranker-base_v1": "tokens",
    "Qwen3-Reranker-8B": "billed_tokens",
    "rerank-2.5-lite": "search_units",
    "Qwen3-Reranker-4B": "none",
}


def test_each_usage_shape_is_recorded_and_priced(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=3))
    standin.update(usage_shapes={"Qwen3-Reranker-4B": "none"})
    requests = [
        {
            "custom_id": f"{model}-{i}",
            "model": model,
            "query": f"query {i} for {model}",
            "documents": [f"text {j} of {i}" for j in range(3 + 50 * i)],
        }
        for model in SHAPED_MODELS
        for i in range(3)
    ]
    set_price = env.cli("prices", "set", "rerank-2.5-lite", "0.002", "--per", "search_unit")
    assert set_price.returncode == 0, set_price.stderr
    env.start_worker(concurrency=4)
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests), "--no-cache")
    wait_ok(env, job_id)
    assert {line["status"] for line in results_of(env, job_id)} == {"succeeded"}

    report = json.loads(env.cli("usage", "--job", job_id, "--json").stdout)
    rows = {row["model"]: row for row in report["by_key_and_model"]}
    for model, shape in SHAPED_MODELS.items():
        mine = [r for r in requests if r["model"] == model]
        tokens = sum(rank(r["query"], r["documents"])[1] for r in mine)
        row = rows[model]
        assert row["billed_calls"] == 3, model
        if shape in ("search_units", "none"):
            assert row["total_tokens"] == 0, model
        else:
            assert row["total_tokens"] == tokens, model
        units = sum(math.ceil(len(r["documents"]) / 100) for r in mine)
        assert row["search_units"] == (units if shape == "search_units" else 0), model
        assert row["usage_unknown_calls"] == (3 if shape == "none" else 0), model
    lite = rows["rerank-2.5-lite"]
    assert lite["search_units"] > 3  # the 103-document requests are two units each
    assert abs(lite["cost"] - 0.002 * lite["search_units"]) < 1e-9
    assert report["usage_unknown_calls"] == 3
    assert report["notes"] == [
        "3 calls billed without a usage figure: their tokens are not in the totals"
    ]
    text = env.cli("usage", "--job", job_id).stdout
    assert "3 calls billed without a usage figure" in text


def test_prices_are_listed_and_set(make_env: Any, database_url: str) -> None:
    env: Env = make_env(database_url)
    assert (
        env.cli("prices", "set", "bge-reranker-v2-m3", "0.5", "--currency", "USD").returncode == 0
    )
    assert env.cli("prices", "set", "rerank-2.5", "0.001", "--per", "search_unit").returncode == 0
    listed = {row["model"]: row for row in json.loads(env.cli("prices", "list", "--json").stdout)}
    assert listed["bge-reranker-v2-m3"] == {
        "model": "bge-reranker-v2-m3",
        "price_per_million_tokens": 0.5,
        "price_per_search_unit": None,
        "currency": "USD",
    }
    assert listed["rerank-2.5"]["price_per_search_unit"] == 0.001
    assert listed["rerank-2.5"]["price_per_million_tokens"] is None
    assert "bge-reranker-v2-m3" in env.cli("prices", "list").stdout
    bad = env.cli("prices", "set", "rerank-2.5", "1", "--per", "request")
    assert bad.returncode == 2 and "per" in bad.stderr
    negative = env.cli("prices", "set", "rerank-2.5", "--", "-1")
    assert negative.returncode == 2
