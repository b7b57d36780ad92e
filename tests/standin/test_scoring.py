"""The stand-in's lexical scores: rankings that read right, the same in every process."""

from __future__ import annotations

import json
import subprocess
import sys

from worker.standin import scoring

CHART_QUERY = "a chart of model accuracy"
DOCUMENTS: list[scoring.Document] = [
    "A photo of a cat asleep on a keyboard.",
    {"text": "Accuracy rose from 71% to 84% after reranking: a chart of each model's accuracy."},
    {"image": "https://example.test/img/holiday-beach.png"},
    "Model accuracy on five benchmarks.",
]


def ranked(query: str, documents: list[scoring.Document]) -> list[int]:
    results, _ = scoring.rank(query, documents, return_documents=False)
    return [r["index"] for r in results]


def test_the_document_sharing_the_querys_words_ranks_first() -> None:
    order = ranked(CHART_QUERY, DOCUMENTS)
    assert order[:2] == [1, 3]
    assert set(order[2:]) == {0, 2}


def test_more_of_the_querys_words_score_higher_and_plurals_match_singulars() -> None:
    query = "rate limits across processes"
    assert scoring.relevance_score(query, "rate limit per process") > scoring.relevance_score(
        query, "a rate of change"
    )
    assert scoring.words("processes queries limits boxes") == ["process", "query", "limit", "box"]


def test_an_image_keeps_a_fixed_low_score_unless_its_urls_words_match() -> None:
    beach = {"image": "https://example.test/img/holiday-beach.png"}
    chart = {"image": "https://example.test/plots/model-accuracy-chart.png"}
    inline = {
        "image": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
    }
    low = scoring.IMAGE_BASE + scoring.TIE_BREAK_SHARE
    assert scoring.relevance_score(CHART_QUERY, beach) < low
    assert scoring.relevance_score(CHART_QUERY, inline) < low
    assert scoring.relevance_score(CHART_QUERY, chart) > 0.3
    assert scoring.document_words(beach) == ["img", "holiday", "beach"]


def test_a_score_depends_on_the_query_and_that_document_only() -> None:
    alone = scoring.relevance_score(CHART_QUERY, DOCUMENTS[3])
    results, _ = scoring.rank(CHART_QUERY, DOCUMENTS, return_documents=False)
    assert next(r["relevance_score"] for r in results if r["index"] == 3) == alone
    assert all(0 <= r["relevance_score"] < 1 for r in results)


def test_scores_are_the_same_in_another_process() -> None:
    code = (
        "import json, sys; from worker.standin import scoring; "
        "docs = json.loads(sys.argv[1]); "
        "print(json.dumps([scoring.relevance_score(sys.argv[2], d) for d in docs]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(DOCUMENTS), CHART_QUERY],
        capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert json.loads(done.stdout) == [scoring.relevance_score(CHART_QUERY, d) for d in DOCUMENTS]
