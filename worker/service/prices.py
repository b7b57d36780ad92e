"""The price table: what a model costs per million tokens or per search unit."""

from __future__ import annotations

from typing import Any

from worker import errors
from worker.db import repository
from worker.db.models import PriceUnit
from worker.service.scope import run_in_transaction, sessions
from worker.settings import Settings

DEFAULT_CURRENCY = "PTC"


def list_prices(settings: Settings | None = None) -> list[dict[str, Any]]:
    with sessions(settings)() as session:
        prices = repository.model_prices(session)
    return [
        {
            "model": model,
            "price_per_million_tokens": per_million,
            "price_per_search_unit": per_unit,
            "currency": currency,
        }
        for model, (per_million, per_unit, currency) in sorted(prices.items())
    ]


def set_price(
    model: str,
    price: float,
    *,
    per: str = PriceUnit.MILLION_TOKENS,
    currency: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Set a model's price per `per`; a model is billed one way, so the other price goes.
    The currency stays as it was unless given."""
    if not model.strip():
        raise errors.InputError("must not be empty", field="model")
    if not price >= 0:
        raise errors.InputError("must be a number >= 0", field="price")
    if per not in tuple(PriceUnit):
        raise errors.InputError(f"must be one of {', '.join(PriceUnit)}, not '{per}'", field="per")
    if currency is not None and not 1 <= len(currency) <= 10:
        raise errors.InputError("must be 1 to 10 characters", field="currency")
    run_in_transaction(
        lambda session: repository.set_price(
            session, model, price, PriceUnit(per), currency or None, DEFAULT_CURRENCY
        ),
        settings,
    )
    return next(row for row in list_prices(settings) if row["model"] == model)
