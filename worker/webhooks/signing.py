"""Standard Webhooks signatures, made by the `standardwebhooks` library (no HMAC of our own)."""

from __future__ import annotations

import datetime as dt
import math

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

SECRET_PREFIX = "whsec_"


def is_webhook_secret(secret: str) -> bool:
    """True for `whsec_` followed by non-empty base64, the form the specification gives."""
    if not secret.startswith(SECRET_PREFIX):
        return False
    try:
        Webhook(secret)
    except (ValueError, EmptyWebhookSecretError):  # bad base64 is a binascii.Error (ValueError)
        return False
    return True


def signed_headers(secret: str, message_id: str, body: str, now: dt.datetime) -> dict[str, str]:
    """The three headers of one attempt; the timestamp is the attempt's own, so a receiver's
    five-minute tolerance holds for a retry sent hours after the job ended."""
    signature = Webhook(secret).sign(message_id, now, body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": signature,
    }
