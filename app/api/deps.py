"""Typed dependencies: settings, a database session, the caller, the dispatcher.

Dependencies that do no I/O are ``async``: FastAPI runs a sync dependency on a worker thread,
and those hops cost more than the work.

Tokens are compared as SHA-256 digests against every known digest, without stopping at the
first match, so a wrong token and a right one take the same time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.errors import ApiError
from app.db.session import open_session
from app.queue import Dispatcher
from app.settings import Settings, admin_digests, hash_token, token_digests

DEFAULT_TENANT = "default"

_BEARER_TEXT = (
    "A tenant token (GPUFLEET_API_TOKENS), an admin token (GPUFLEET_ADMIN_TOKENS) "
    "or, for /metrics only, GPUFLEET_METRICS_TOKEN."
)


@dataclass(frozen=True)
class Caller:
    """Who is asking. ``scope`` limits job views to one tenant (None: every tenant)."""

    name: str
    tenant: str | None  #: the tenant it submits as; None for an admin
    scope: str | None
    admin: bool  #: sees fleet-wide views
    metrics_only: bool = False


class Auth:
    """The known tokens, as digests, built once per app."""

    def __init__(self, settings: Settings) -> None:
        self.required = settings.auth_required or bool(settings.admin_tokens.strip())
        self._known: list[tuple[str, Caller]] = [
            (digest, Caller(name=tenant, tenant=tenant, scope=tenant, admin=False))
            for digest, tenant in token_digests(settings.api_tokens).items()
        ]
        self._known += [
            (digest, Caller(name=name, tenant=None, scope=None, admin=True))
            for name, digest in admin_digests(settings.admin_tokens).items()
        ]
        if settings.metrics_token.strip():
            metrics = Caller(name="metrics", tenant=None, scope="", admin=False, metrics_only=True)
            self._known.append((hash_token(settings.metrics_token.strip()), metrics))

    def caller(self, token: str | None) -> Caller:
        if not self.required:
            return Caller(name=DEFAULT_TENANT, tenant=DEFAULT_TENANT, scope=None, admin=True)
        if not token:
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = hash_token(token.strip()).encode()
        found: Caller | None = None
        for known, who in self._known:  # no early exit: every token costs the same
            if hmac.compare_digest(known.encode(), digest):
                found = who
        if found is None:
            raise ApiError(
                401, "unauthorized", "unknown token", headers={"WWW-Authenticate": "Bearer"}
            )
        return found


def _query_names(dependant: Any) -> set[str]:
    """The query parameters of an operation and of every dependency it has."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


#: each route's query parameter names, by its dependant's id (routes live as long as the app).
_known_names: dict[int, tuple[Any, frozenset[str]]] = {}


def _route_query_names(dependant: Any) -> frozenset[str]:
    cached = _known_names.get(id(dependant))
    if cached is None or cached[0] is not dependant:
        cached = _known_names[id(dependant)] = (dependant, frozenset(_query_names(dependant)))
    return cached[1]


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the operation does not have: ``?stauts=queued`` would
    otherwise list every job, silently."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.scope.get("query_string"):
        return
    known = _route_query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        offered = ", ".join(sorted(known)) or "none"
        raise ApiError(
            422,
            "invalid_request",
            f"unknown query parameter(s) {', '.join(repr(u) for u in unknown)}; "
            f"this operation takes: {offered}",
        )


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request. It never commits by itself: a handler that writes commits
    before it answers (a yield-dependency's exit may run after the response is sent)."""
    with open_session(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    auth: Auth = request.app.state.auth
    if credentials is None and request.headers.get("authorization"):
        raise ApiError(
            401,
            "unauthorized",
            "malformed Authorization header: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return auth.caller(None if credentials is None else credentials.credentials)


class _CallerBearer(HTTPBearer):
    """The bearer scheme and the token check in one dependency: the scheme still documents
    itself in OpenAPI (as ``HTTPBearer``), and a request solves one dependency for its caller
    instead of two (every request solves it; each level costs more than the check)."""

    def __init__(self, *, tenant_only: bool) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer", description=_BEARER_TEXT)
        self.tenant_only = tenant_only

    async def __call__(self, request: Request) -> Caller:  # type: ignore[override]
        caller = _caller(request, await super().__call__(request))
        if self.tenant_only and caller.metrics_only:
            raise ApiError(403, "forbidden", "the metrics token reads /metrics only")
        return caller


#: whoever holds a known token, the metrics token included.
any_caller = _CallerBearer(tenant_only=False)
#: a tenant or an admin.
get_caller = _CallerBearer(tenant_only=True)

CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_admin(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise ApiError(403, "forbidden", "this view needs an admin token (GPUFLEET_ADMIN_TOKENS)")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]


async def metrics_caller(caller: Annotated[Caller, Depends(any_caller)]) -> Caller:
    if not (caller.admin or caller.metrics_only):
        raise ApiError(403, "forbidden", "/metrics needs the metrics token or an admin token")
    return caller


MetricsCallerDep = Annotated[Caller, Depends(metrics_caller)]
