"""Typed dependencies: settings, a database session, the caller's tenant, the dispatcher."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.api.errors import ApiError
from app.db.session import open_session
from app.queue import Dispatcher
from app.settings import Settings

DEFAULT_TENANT = "default"


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request, committed when the handler returns (rolled back if it raises)."""
    with open_session(settings.database_url) as session:
        yield session
        session.commit()


SessionDep = Annotated[Session, Depends(get_session)]


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_tenant(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant of the bearer token; with no tokens configured, the one tenant ``default``."""
    tokens = settings.tokens
    if not tokens:
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token: send 'Authorization: Bearer <token>'",
        )
    for known, tenant in tokens.items():
        if hmac.compare_digest(known.encode(), token.strip().encode()):
            return tenant
    raise ApiError(401, "unauthorized", "unknown token")


TenantDep = Annotated[str, Depends(get_tenant)]
