"""Submitting, reading, listing and cancelling jobs (the user's side of the jobs table)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.events import add_event
from app.db.models import Checkpoint, Device, Job, Lease
from app.domain.routing import device_fits
from app.domain.spec import JobSpec
from app.domain.states import EventKind, JobStatus


class IdempotencyConflict(Exception):
    """This Idempotency-Key was already used with a different job body."""


class JobNotFound(Exception):
    """No such job for this tenant."""


class JobAlreadyFinished(Exception):
    """The job has already finished; there is nothing to cancel."""


@dataclass(frozen=True)
class Submitted:
    job_id: uuid.UUID
    created: bool  #: False when an Idempotency-Key returned an earlier job


def spec_hash(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    *, session: Session, tenant: str, spec: JobSpec, idempotency_key: str | None = None
) -> Submitted:
    """Insert a queued job and its event; with a key, return the earlier job instead."""
    digest = spec_hash(spec)
    values = {
        "id": uuid.uuid4(),
        "tenant": tenant,
        "name": spec.name,
        "status": JobStatus.QUEUED,
        "spec": spec.model_dump(mode="json"),
        "queue": spec.queue,
        "priority": spec.priority,
        "idempotency_key": idempotency_key,
        "spec_hash": digest,
        "max_attempts": spec.max_attempts,
        "dispatched_at": text("now()"),
    }
    insert = pg_insert(Job).values(**values)
    if idempotency_key is not None:
        insert = insert.on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
    new_id = session.scalar(insert.returning(Job.id))
    if new_id is None:
        earlier = session.execute(
            select(Job.id, Job.spec_hash).where(
                Job.tenant == tenant, Job.idempotency_key == idempotency_key
            )
        ).one()
        if earlier.spec_hash != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was used for job {earlier.id} "
                "with a different body"
            )
        return Submitted(job_id=earlier.id, created=False)
    add_event(session=session, job_id=new_id, kind=EventKind.SUBMITTED, data={"queue": spec.queue})
    return Submitted(job_id=new_id, created=True)


def cancel_job(*, session: Session, tenant: str, job_id: uuid.UUID) -> JobStatus:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.tenant == tenant,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .values(
            cancel_requested=True,
            status=text("CASE WHEN status = 'queued' THEN 'cancelled'::job_status ELSE status END"),
            finished_at=text("CASE WHEN status = 'queued' THEN now() ELSE finished_at END"),
            error=text(
                "CASE WHEN status = 'queued' THEN "
                """'{"kind": "cancelled", "message": "cancelled before it ran"}'::jsonb """
                "ELSE error END"
            ),
        )
        .returning(Job.status, Job.epoch)
    ).one_or_none()
    if row is None:
        status = session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant == tenant))
        if status is None:
            raise JobNotFound(f"job {job_id} not found")
        raise JobAlreadyFinished(f"job {job_id} is already {status.value}")
    kind = EventKind.CANCELLED if row.status == JobStatus.CANCELLED else EventKind.CANCEL_REQUESTED
    add_event(session=session, job_id=job_id, kind=kind, epoch=row.epoch)
    return JobStatus(row.status)


def job_queue_info(*, session: Session, job_id: uuid.UUID) -> tuple[str, int] | None:
    row = session.execute(select(Job.queue, Job.priority).where(Job.id == job_id)).one_or_none()
    return None if row is None else (row.queue, row.priority)


def job_tenant_exists(*, session: Session, tenant: str, job_id: uuid.UUID) -> bool:
    found = session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant == tenant))
    return found is not None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class FleetDevice:
    """A registered device as :func:`waiting_reason` sees it."""

    gpu_type: str
    memory_bytes: int
    alive: bool  #: a worker holds it now
    suspect: bool
    #: what its (last) worker offered, name -> version; None: not reported.
    frameworks: dict[str, str] | None


def fleet_devices(session: Session) -> list[FleetDevice]:
    rows = session.execute(
        select(
            Device.gpu_type,
            Device.memory_bytes,
            func.coalesce(Device.expires_at >= func.now(), False).label("alive"),
            Device.suspect_since.is_not(None).label("suspect"),
            Device.frameworks,
        )
    ).all()
    return [
        FleetDevice(
            gpu_type=r.gpu_type,
            memory_bytes=r.memory_bytes,
            alive=bool(r.alive),
            suspect=bool(r.suspect),
            frameworks=r.frameworks,
        )
        for r in rows
    ]


def fits(spec: JobSpec, devices: list[FleetDevice]) -> list[FleetDevice]:
    return [
        d
        for d in devices
        if device_fits(
            device_type=d.gpu_type,
            device_memory_gib=d.memory_bytes / 2**30,
            job_type=spec.resources.gpu_type,
            job_memory_gb=spec.resources.memory_gb,
        )
    ]


def fitting_reason(spec: JobSpec, fitting: list[FleetDevice]) -> str | None:
    """Why a job waits although devices of its type and size are registered: none of their
    workers offers its framework, or every one that does is suspect.

    The framework is judged on the fitting devices whose workers reported what they offer,
    the live ones when there are any (a stopped worker's list may be stale).
    """
    framework = spec.effective_framework
    known = [d for d in fitting if d.frameworks is not None]
    live = [d for d in known if d.alive]
    judged = live or known
    if judged and not any(framework in (d.frameworks or {}) for d in judged):
        offers = sorted({name for d in judged for name in d.frameworks or {}})
        who = "live worker" if live else "worker"
        return (
            f"no {who} of a device that fits has framework {framework!r} "
            f"(they offer: {', '.join(offers) or 'none'}); "
            f"start a worker that can import {framework}"
        )
    usable = [d for d in fitting if d.frameworks is None or framework in d.frameworks]
    if usable and all(d.suspect for d in usable):
        return (
            f"every device that fits ({len(usable)}) is suspect after a GPU fault; "
            "they take jobs again once their health check passes"
        )
    return None


def waiting_reason(
    *, session: Session, job: Job, devices: list[FleetDevice] | None = None
) -> str | None:
    """Why a queued job is not running, when no registered device could run it now."""
    if job.status != JobStatus.QUEUED:
        return None
    spec = JobSpec.model_validate(job.spec)
    if devices is None:
        devices = fleet_devices(session)
    fitting = fits(spec, devices)
    if not devices:
        return "no devices are registered: start a worker (gpufleet worker)"
    if not fitting:
        have = ", ".join(sorted({f"{d.gpu_type}:{d.memory_bytes / 2**30:.0f}GiB" for d in devices}))
        return (
            f"no registered device fits gpu_type={spec.resources.gpu_type} "
            f"memory_gb={spec.resources.memory_gb:g} (devices: {have})"
        )
    return fitting_reason(spec, fitting)


def job_view(*, session: Session, tenant: str, job_id: uuid.UUID) -> dict[str, Any]:
    """The job as API.md shows it."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    return _view(session=session, job=job)


def _view(
    *, session: Session, job: Job, devices: list[FleetDevice] | None = None
) -> dict[str, Any]:
    live = session.scalar(select(Lease).where(Lease.job_id == job.id, Lease.released_at.is_(None)))
    leases = session.scalars(select(Lease).where(Lease.job_id == job.id).order_by(Lease.epoch))
    checkpoint = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id)
        .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    spec = job.spec
    batch_size = int(spec["training"]["batch_size"])
    micro = job.micro_batch or batch_size
    return {
        "id": str(job.id),
        "name": job.name,
        "tenant": job.tenant,
        "status": job.status.value,
        "spec": spec,
        "queue": job.queue,
        "priority": job.priority,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "retry_at": _iso(job.retry_at),
        "waiting_reason": waiting_reason(session=session, job=job, devices=devices),
        "cancel_requested": job.cancel_requested,
        "lease": None
        if live is None
        else {
            "worker": live.worker,
            "device": live.device_uuid,
            "epoch": live.epoch,
            "expires_at": _iso(live.expires_at),
        },
        "leases": [
            {
                "epoch": lease.epoch,
                "worker": lease.worker,
                "device": lease.device_uuid,
                "acquired_at": _iso(lease.acquired_at),
                "released_at": _iso(lease.released_at),
                "outcome": None if lease.outcome is None else lease.outcome.value,
            }
            for lease in leases
        ],
        "progress": job.progress,
        "checkpoint": None
        if checkpoint is None
        else {
            "step": checkpoint.step,
            "path": checkpoint.path,
            "saved_at": _iso(checkpoint.saved_at),
        },
        "batch": {
            "size": batch_size,
            "micro_batch": micro,
            "accumulation": -(-batch_size // micro),
        },
        "gpu": None
        if job.gpu_util_samples == 0 and job.gpu_peak_memory_bytes is None
        else {
            "peak_memory_gb": None
            if job.gpu_peak_memory_bytes is None
            else round(job.gpu_peak_memory_bytes / 1e9, 3),
            "mean_utilization": None
            if job.gpu_util_samples == 0
            else round(job.gpu_util_sum / job.gpu_util_samples, 4),
        },
        "result": job.result,
        "error": job.error,
    }


def list_jobs(
    *,
    session: Session,
    tenant: str,
    status: JobStatus | None,
    limit: int,
    cursor: tuple[datetime, uuid.UUID] | None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    """Newest first; the cursor is the (created_at, id) of the last job of the previous page."""
    query = select(Job).where(Job.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        at, last_id = cursor
        query = query.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < last_id)))
    jobs = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    more = len(jobs) > limit
    jobs = jobs[:limit]
    next_cursor = (jobs[-1].created_at, jobs[-1].id) if more and jobs else None
    devices = fleet_devices(session)
    return [_view(session=session, job=j, devices=devices) for j in jobs], next_cursor


def job_status(*, session: Session, job_id: uuid.UUID) -> JobStatus | None:
    status: JobStatus | None = session.scalar(select(Job.status).where(Job.id == job_id))
    return status
