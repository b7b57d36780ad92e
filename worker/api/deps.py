"""The dependencies routes take, as typed aliases: the settings and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker import tenants
from worker.service.scope import Scope
from worker.settings import Settings

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A tenant's token from `rerank-worker tokens create NAME`.",
)


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_caller(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> tenants.Caller:
    """The tenant whose token the request carries; 401 for no token or one that is not valid
    (unknown, malformed or revoked: the answer does not say which)."""
    caller = tenants.verify_token(credentials.credentials, settings) if credentials else None
    if caller is None:
        raise HTTPException(
            status_code=401,
            detail="a valid token is required: Authorization: Bearer TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return caller


CallerDep = Annotated[tenants.Caller, Depends(get_caller)]


def get_scope(caller: CallerDep) -> Scope:
    return caller.scope


ScopeDep = Annotated[Scope, Depends(get_scope)]
