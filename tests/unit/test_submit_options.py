"""A job's options (the CLI's flags, the API's query parameters) that no column can hold are
refused before anything is stored, naming the option and its cap."""

from __future__ import annotations

from typing import Any

import pytest

from worker import errors
from worker.service.submit import JobOptions


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        ({"top_n": 10**30}, "top_n", "over the cap of 2,147,483,647"),
        ({"top_n": 0}, "top_n", "must be a positive integer"),
        ({"max_tokens": 2**63}, "max_tokens", "over the cap of 9,223,372,036,854,775,807"),
        ({"max_cost": 1e9}, "max_cost", "must be a positive number below 1,000,000,000"),
        ({"max_cost": float("inf")}, "max_cost", "must be a positive number below 1,000,000,000"),
        ({"max_cost": float("nan")}, "max_cost", "must be a positive number below 1,000,000,000"),
        ({"model": "m" * 101}, "model", "101 characters, over the cap of 100"),
        ({"model": " "}, "model", "must not be blank"),
        ({"idempotency_key": "k" * 201}, "idempotency_key", "201 characters, over the cap of 200"),
        ({"webhook_url": "h" * 2001}, "webhook_url", "2,001 characters, over the cap of 2,000"),
        ({"on_complete": "t" * 201}, "on_complete", "201 characters, over the cap of 200"),
        ({"query": "a\x00b"}, "query", "holds a NUL character"),
        # An undecodable byte in a command-line argument becomes a lone surrogate.
        ({"query": "caf\udce9"}, "query", "holds a lone surrogate"),
        ({"idempotency_key": "\ud800"}, "idempotency_key", "holds a lone surrogate"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_an_option_no_column_can_hold_is_refused_naming_it(
    options: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(errors.InputError) as caught:
        JobOptions(**options).check()
    assert caught.value.field == field
    assert caught.value.reason.startswith(reason)


def test_options_at_their_caps_are_accepted() -> None:
    JobOptions(
        top_n=2**31 - 1,
        max_tokens=2**63 - 1,
        max_cost=999_999_999.0,
        model="m" * 100,
        idempotency_key="k" * 200,
        query="ünïcødé ✓",
    ).check()


def test_an_empty_model_option_means_the_default_as_before() -> None:
    JobOptions(model="").check()
