"""Jobs: submit, read, list, cancel, events and logs. Routes translate HTTP <-> domain only."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import DispatcherDep, SessionDep, SettingsDep, TenantDep
from app.api.errors import ApiError
from app.db import jobs as job_rows
from app.db.devices import list_devices
from app.db.events import list_events
from app.db.logs import read_logs
from app.db.session import session_scope
from app.domain.routing import RoutingError, device_fits
from app.domain.spec import JobSpec, SpecPolicyError, check_policy
from app.domain.states import JobStatus
from app.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: how often a live stream looks for news, and the longest it stays open.
STREAM_POLL_S = 0.5
STREAM_MAX_S = 3600.0


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"job {raw!r} not found (not a job id)") from None


def _checked(spec: JobSpec, settings: Settings) -> str:
    """Deployment policy and routing; returns the queue."""
    try:
        check_policy(
            spec,
            entrypoint_prefixes=settings.entrypoint_prefixes,
            fault_injection=settings.fault_injection,
        )
        return spec.queue
    except (SpecPolicyError, RoutingError) as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


@router.post("", status_code=201)
def submit(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    """Submit a training job. The same Idempotency-Key and body again returns the first job."""
    _checked(spec, settings)
    try:
        submitted = job_rows.submit_job(
            session=session, tenant=tenant, spec=spec, idempotency_key=idempotency_key
        )
    except job_rows.IdempotencyConflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    session.commit()  # dispatch only what is committed: the reaper is the outbox
    if submitted.created:
        dispatcher.dispatch(job_id=submitted.job_id, queue=spec.queue, priority=spec.priority)
    else:
        response.status_code = 200
    return job_rows.job_view(session=session, tenant=tenant, job_id=submitted.job_id)


@router.post("/validate")
def validate(spec: JobSpec, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Whether the spec is valid here and which registered devices could run it."""
    queue = _checked(spec, settings)
    keys = ("uuid", "host", "index", "type", "memory_gb", "worker", "alive", "suspect")
    fits = [
        {**{k: d[k] for k in keys}, "frameworks": sorted(d["frameworks"] or {})}
        for d in list_devices(session=session)
        if device_fits(
            device_type=d["type"],
            device_memory_gib=d["memory_gb"],
            job_type=spec.resources.gpu_type,
            job_memory_gb=spec.resources.memory_gb,
        )
    ]
    if not fits:
        reason: str | None = (
            f"no registered device fits gpu_type={spec.resources.gpu_type} "
            f"memory_gb={spec.resources.memory_gb:g}; the job would wait"
        )
    else:
        devices = job_rows.fleet_devices(session)
        reason = job_rows.fitting_reason(spec, job_rows.fits(spec, devices))
    return {"valid": True, "queue": queue, "fits": fits, "waiting_reason": reason}


def _encode_cursor(cursor: tuple[datetime, uuid.UUID] | None) -> str | None:
    if cursor is None:
        return None
    raw = json.dumps([cursor[0].isoformat(), str(cursor[1])]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(raw: str | None) -> tuple[datetime, uuid.UUID] | None:
    if raw is None:
        return None
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return datetime.fromisoformat(at), uuid.UUID(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(
            422, "invalid_request", "cursor: not a cursor from a previous page's next_cursor"
        ) from None


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The tenant's jobs, newest first; pass ``next_cursor`` back for the next page."""
    jobs, next_cursor = job_rows.list_jobs(
        session=session, tenant=tenant, status=status, limit=limit, cursor=_decode_cursor(cursor)
    )
    return {"jobs": jobs, "next_cursor": _encode_cursor(next_cursor)}


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    try:
        return job_rows.job_view(session=session, tenant=tenant, job_id=_job_id(job_id))
    except job_rows.JobNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.post("/{job_id}/cancel", status_code=202)
def cancel(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next step."""
    parsed = _job_id(job_id)
    try:
        job_rows.cancel_job(session=session, tenant=tenant, job_id=parsed)
    except job_rows.JobNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except job_rows.JobAlreadyFinished as exc:
        raise ApiError(409, "already_finished", str(exc)) from None
    return job_rows.job_view(session=session, tenant=tenant, job_id=parsed)


def _require_job(session: SessionDep, tenant: str, job_id: str) -> uuid.UUID:
    parsed = _job_id(job_id)
    if not job_rows.job_tenant_exists(session=session, tenant=tenant, job_id=parsed):
        raise ApiError(404, "not_found", f"job {job_id} not found")
    return parsed


def _follow(
    settings: Settings,
    job_id: uuid.UUID,
    fetch: Callable[[Any, int], list[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
) -> Iterator[str]:
    """Poll for new rows until the job is final and everything was sent."""
    after, deadline = 0, time.monotonic() + STREAM_MAX_S
    while time.monotonic() < deadline:
        with session_scope(settings.database_url) as session:
            rows = fetch(session, after)
            status = job_rows.job_status(session=session, job_id=job_id)
        for row in rows:
            after = row["id"]
            yield render(row)
        if not rows and (status is None or status.is_final):
            return
        if not rows:
            time.sleep(STREAM_POLL_S)


@router.get("/{job_id}/events", response_model=None)
def events(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any] | StreamingResponse:
    """The job's history; with ``Accept: text/event-stream``, a live stream until it ends."""
    parsed = _require_job(session, tenant, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return {"events": list_events(session=session, job_id=parsed)}
    stream = _follow(
        settings,
        parsed,
        lambda s, after: list_events(session=s, job_id=parsed, after_id=after),
        lambda e: f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n",
    )
    return StreamingResponse(stream, media_type="text/event-stream")


@router.get("/{job_id}/logs", response_model=None)
def logs(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    follow: bool = False,
) -> dict[str, Any] | StreamingResponse:
    """The trainer's output, every attempt; ``?follow=true`` streams it until the job ends."""
    parsed = _require_job(session, tenant, job_id)
    if not follow:
        chunks = read_logs(session=session, job_id=parsed, limit=10_000)
        return {"logs": chunks, "text": "".join(c["text"] for c in chunks)}
    stream = _follow(
        settings,
        parsed,
        lambda s, after: read_logs(session=s, job_id=parsed, after_id=after),
        lambda c: str(c["text"]),
    )
    return StreamingResponse(stream, media_type="text/plain")
