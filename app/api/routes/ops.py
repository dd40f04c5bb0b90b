"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import DispatcherDep, MetricsCallerDep, SettingsDep
from app.api.errors import error_body, responses
from app.api.schemas import ErrorBody, Health, Ready
from app.db.session import session_scope

router = APIRouter(tags=["ops"])


@router.get("/healthz", operation_id="healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive (no token needed)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Ready,
    responses={503: {"model": ErrorBody, "description": "The database or the broker is down."}},
)
def readyz(settings: SettingsDep, dispatcher: DispatcherDep) -> Ready | JSONResponse:
    """The database and the broker are reachable (no token needed)."""
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
        return Ready(status="ok", checks=checks)
    failed = ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(
        error_body("not_ready", f"{failed} unreachable", checks=checks), status_code=503
    )


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format.",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        },
        **responses(401, 403, 503),
    },
)
def metrics(request: Request, _: MetricsCallerDep) -> Response:
    """Prometheus text format; needs GPUFLEET_METRICS_TOKEN or an admin token."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
