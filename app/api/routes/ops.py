"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import DispatcherDep, SettingsDep
from app.db.session import session_scope

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(settings: SettingsDep, dispatcher: DispatcherDep) -> dict[str, Any] | JSONResponse:
    """The database and the broker are reachable."""
    checks: dict[str, str] = {}
    try:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        dispatcher.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ok", "checks": checks}
    failed = ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(
        {"error": {"code": "not_ready", "message": f"{failed} unreachable", "checks": checks}},
        status_code=503,
    )


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
