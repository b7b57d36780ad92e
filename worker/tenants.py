"""Tenants of the HTTP API and their tokens: create, verify, list, revoke.

A token is `rrw_` + an 8-character prefix + `_` + a 43-character secret. Only the SHA-256 of
the whole token is stored; the prefix finds the row and the hash is compared in constant time,
so a token is never kept, logged or shown after `create` printed it once.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker import errors
from worker.db.base import utcnow
from worker.db.models import Tenant
from worker.service.scope import Scope, sessions, tenant_scope
from worker.settings import Settings

TOKEN_HEAD = "rrw_"
PREFIX_CHARS = 8
SECRET_BYTES = 32
WEBHOOK_SECRET_HEAD = "whsec_"
WEBHOOK_SECRET_BYTES = 24
MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class NewTenant:
    """What `tokens create` shows once: the token and the webhook secret."""

    name: str
    token: str
    webhook_secret: str
    is_admin: bool


@dataclass(frozen=True)
class Caller:
    """The tenant a valid token belongs to."""

    tenant_id: int
    name: str
    is_admin: bool

    @property
    def scope(self) -> Scope:
        return tenant_scope(self.tenant_id, self.is_admin)


@dataclass(frozen=True)
class TenantInfo:
    name: str
    is_admin: bool
    created_at: dt.datetime
    revoked_at: dt.datetime | None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _prefix_of(token: str) -> str | None:
    """The lookup prefix of a well-formed token, None for anything else."""
    body = token[len(TOKEN_HEAD) :]
    if not token.startswith(TOKEN_HEAD) or len(body) <= PREFIX_CHARS + 1:
        return None
    if body[PREFIX_CHARS] != "_":
        return None
    return body[:PREFIX_CHARS]


def _new_token() -> tuple[str, str]:
    prefix = secrets.token_urlsafe(PREFIX_CHARS)[:PREFIX_CHARS]
    return prefix, f"{TOKEN_HEAD}{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


def new_webhook_secret() -> str:
    """Standard Webhooks' format: `whsec_` + base64 of random bytes."""
    return (
        WEBHOOK_SECRET_HEAD + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode()
    )


def _by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def create_tenant(name: str, settings: Settings, *, is_admin: bool = False) -> NewTenant:
    """A tenant with a new token; InputError when the name is taken or unusable."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise errors.InputError(
            f"must be a non-empty name of at most {MAX_NAME_LENGTH} characters", field="name"
        )
    prefix, token = _new_token()
    webhook_secret = new_webhook_secret()
    taken = errors.InputError(f"a tenant named '{name}' already exists", field="name")
    try:
        with sessions(settings).begin() as session:
            if _by_name(session, name) is not None:
                raise taken
            session.add(
                Tenant(
                    name=name,
                    token_prefix=prefix,
                    token_hash=_hash(token),
                    is_admin=is_admin,
                    webhook_secret=webhook_secret,
                )
            )
    except IntegrityError as exc:  # the same name created at the same moment elsewhere
        raise taken from exc
    return NewTenant(name=name, token=token, webhook_secret=webhook_secret, is_admin=is_admin)


def verify_token(token: str, settings: Settings) -> Caller | None:
    """The tenant of a valid, unrevoked token; None for any other string."""
    prefix = _prefix_of(token)
    if prefix is None:
        return None
    # The columns, not the ORM object: every API call comes through here.
    with sessions(settings)() as session:
        tenant = session.execute(
            select(
                Tenant.id, Tenant.name, Tenant.is_admin, Tenant.token_hash, Tenant.revoked_at
            ).where(Tenant.token_prefix == prefix)
        ).first()
    if tenant is None or tenant.revoked_at is not None:
        return None
    if not hmac.compare_digest(tenant.token_hash, _hash(token)):
        return None
    return Caller(tenant_id=tenant.id, name=tenant.name, is_admin=tenant.is_admin)


def list_tenants(settings: Settings) -> list[TenantInfo]:
    with sessions(settings)() as session:
        rows = session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()
        return [TenantInfo(t.name, t.is_admin, t.created_at, t.revoked_at) for t in rows]


def revoke_tenant(name: str, settings: Settings) -> bool:
    """Its token answers 401 from now on; False when it was revoked already."""
    with sessions(settings).begin() as session:
        tenant = _by_name(session, name)
        if tenant is None:
            raise errors.InputError(f"no tenant named '{name}'", field="name")
        if tenant.revoked_at is not None:
            return False
        tenant.revoked_at = utcnow()
        return True


def tenant_id_of(name: str, settings: Settings) -> int:
    """The id of the tenant with this name (revoked or not); InputError when there is none."""
    with sessions(settings)() as session:
        tenant = _by_name(session, name)
    if tenant is None:
        raise errors.InputError(f"no tenant named '{name}'", field="tenant")
    return tenant.id
