"""Fuzz the live API from its own OpenAPI document (schemathesis): no answer is a 5xx, and
every answer matches the document (status, content type, headers, body schema).

The operations are walked here rather than through `schemathesis.pytest.from_fixture`,
whose lazy loader does not run on pytest 9; the cases and checks are schemathesis' own.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from conftest import ApiServer
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = 40


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_api_answers_as_its_openapi_document_says(api_server: ApiServer) -> None:
    schema = schemathesis.openapi.from_url(f"{api_server.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {api_server.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/jobs",
        "GET /v1/jobs",
        "GET /v1/jobs/{job_id}",
        "POST /v1/jobs/{job_id}/cancel",
        "GET /v1/jobs/{job_id}/results",
        "GET /v1/usage",
        "GET /healthz",
    }
    for operation in operations:
        # A body that matches the document's schema may still be a bad requests file (a
        # JSON Lines body is any string), so "valid data is accepted" cannot hold there.
        excluded = [positive_data_acceptance] if operation.path == "/v1/jobs" else []
        fuzz(operation, headers, excluded)


def fuzz(operation: Any, headers: dict[str, str], excluded: list[Any]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def one_operation(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    one_operation()
