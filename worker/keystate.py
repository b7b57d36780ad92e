"""What the keys and queues look like now, read from Redis for displays (metrics, dashboard, top).

The API holds no upstream key, so it cannot know the keys from its settings: every worker
process publishes its keys' NAMEs and limits (never a secret) to one Redis hash, refreshed
by its sweeper thread. A key no worker has published for a day is left out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from worker import constants
from worker.settings import ApiKey

REGISTRY_KEY = constants.REDIS_PREFIX + "keys"
FORGET_AFTER_S = 24 * 3600.0
# PTTL's answers for a key without an expiry, and for no such key.
NO_EXPIRY, MISSING = -1, -2


@dataclass(frozen=True)
class KeyLimits:
    name: str
    slots: int
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class KeyState:
    name: str
    slots_limit: int
    slots_in_use: int
    paused_s: float
    out_of_use: bool
    # Seconds until the key is tried again; None while out of use until a restart.
    out_of_use_s: float | None
    out_of_use_reason: str | None
    rpm: int | None
    tpm: int | None


def limits_of(key: ApiKey) -> KeyLimits:
    # rpm / tpm exist once RERANK_API_KEYS takes them (the JSON form).
    return KeyLimits(
        key.name, key.max_concurrency, getattr(key, "rpm", None), getattr(key, "tpm", None)
    )


def publish(client: redis.Redis, keys: Iterable[ApiKey]) -> None:
    """Say which keys this worker calls with, and their limits."""
    now_s = time.time()
    mapping = {
        k.name: json.dumps({"slots": k.slots, "rpm": k.rpm, "tpm": k.tpm, "seen_at": now_s})
        for k in map(limits_of, keys)
    }
    if mapping:
        client.hset(REGISTRY_KEY, mapping=mapping)  # type: ignore[arg-type]


def published(client: redis.Redis) -> list[KeyLimits]:
    """The keys workers published within the last day, by NAME."""
    now_s = time.time()
    found = []
    for raw_name, raw in client.hgetall(REGISTRY_KEY).items():
        entry = json.loads(raw)
        if now_s - float(entry.get("seen_at", 0)) <= FORGET_AFTER_S:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            found.append(KeyLimits(name, int(entry["slots"]), entry.get("rpm"), entry.get("tpm")))
    return sorted(found, key=lambda k: k.name)


def known_keys(client: redis.Redis, configured: Sequence[ApiKey] = ()) -> list[KeyLimits]:
    """The configured keys, else (an API process, which has none) the published ones."""
    if configured:
        return [limits_of(k) for k in configured]
    return published(client)


def read(client: redis.Redis, keys: Sequence[KeyLimits]) -> list[KeyState]:
    """Each key's slots in use, pause and retirement, in one round trip."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zcount(constants.SLOTS_KEY.format(name=key.name), now_ms, "+inf")
        pipe.pttl(constants.PAUSE_KEY.format(name=key.name))
        pipe.pttl(constants.REVOKED_KEY.format(name=key.name))
        pipe.get(constants.REVOKED_KEY.format(name=key.name))
    answers = iter(pipe.execute())
    states = []
    for key in keys:
        in_use, pause_ms, revoked_ms, reason = (next(answers) for _ in range(4))
        states.append(
            KeyState(
                name=key.name,
                slots_limit=key.slots,
                slots_in_use=int(in_use),
                paused_s=max(0, int(pause_ms)) / 1000,
                out_of_use=revoked_ms != MISSING,
                out_of_use_s=None if revoked_ms in (MISSING, NO_EXPIRY) else revoked_ms / 1000,
                out_of_use_reason=reason.decode(errors="replace") if reason else None,
                rpm=key.rpm,
                tpm=key.tpm,
            )
        )
    return states
