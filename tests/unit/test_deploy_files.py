"""The shipped Grafana dashboard and Prometheus alert rules parse and name only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from worker import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Exported at scrape time from Redis (metrics.RedisStateCollector), plus Prometheus' own `up`.
REDIS_STATE = {
    "rerank_redis_up",
    "rerank_key_slots_in_use",
    "rerank_key_slots_limit",
    "rerank_key_paused_seconds",
    "rerank_key_out_of_use",
    "rerank_queue_depth",
}


def exported() -> set[str]:
    names = set(REDIS_STATE) | {"up"}
    for value in vars(metrics).values():
        if hasattr(value, "_type") and hasattr(value, "_name"):
            base = value._name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return names


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\b(rerank_[a-z_]+|up)\b(?=\s*[{\[(]|\s*[=<>!)]|\s*$)", expression))


def test_the_alert_rules_parse_and_use_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) >= 8
    for expression in expressions:
        names = metric_names(expression)
        assert names and names <= exported(), (expression, names - exported())


def test_the_grafana_dashboard_parses_and_uses_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "rerank-worker.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert dashboard["uid"] == "rerank-worker" and len(expressions) >= 10
    for expression in expressions:
        names = metric_names(expression)
        assert names and names <= exported(), (expression, names - exported())
