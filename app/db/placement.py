"""What a worker reads to decide whether to let a job go to a more plentiful GPU type
(``app.domain.scarcity``, ``workers.deferral``): the live devices, and the waiting job."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.domain.routing import ANY_TYPE, DEFAULT_FRAMEWORK
from app.domain.scarcity import LiveDevice


@dataclass(frozen=True)
class WaitingJob:
    """A queued job, as far as placement needs it."""

    priority: int
    gpu_types: tuple[str, ...]
    memory_gb: float
    framework: str


def live_devices(*, session: Session) -> list[LiveDevice]:
    """Devices held by live workers; idle means no job on it and not suspect."""
    rows = session.execute(
        text(
            """
            SELECT gpu_type, memory_bytes, frameworks,
                   current_job IS NULL AND suspect_since IS NULL AS idle
              FROM devices WHERE worker IS NOT NULL AND expires_at >= now()
            """
        )
    ).all()
    return [
        LiveDevice(
            gpu_type=r.gpu_type,
            memory_gib=r.memory_bytes / 2**30,
            idle=bool(r.idle),
            frameworks=None if r.frameworks is None else frozenset(r.frameworks),
        )
        for r in rows
    ]


def waiting_job(*, session: Session, job_id: uuid.UUID) -> WaitingJob | None:
    """The job if it is queued (not necessarily due), else None."""
    row = session.execute(
        text(
            """
            SELECT priority, spec->'resources'->'gpu_type' AS gpu_type,
                   (spec->'resources'->>'memory_gb')::float AS memory_gb,
                   spec->>'framework' AS framework
              FROM jobs WHERE id = :id AND status = 'queued' AND NOT cancel_requested
            """
        ),
        {"id": job_id},
    ).one_or_none()
    if row is None:
        return None
    raw = row.gpu_type if row.gpu_type is not None else ANY_TYPE
    types = tuple(raw) if isinstance(raw, list) else (str(raw),)
    return WaitingJob(
        priority=row.priority,
        gpu_types=types,
        memory_gb=row.memory_gb if row.memory_gb is not None else 8.0,
        framework=row.framework or DEFAULT_FRAMEWORK,
    )


def still_queued(*, session: Session, job_id: uuid.UUID) -> bool:
    return bool(
        session.scalar(text("SELECT status = 'queued' FROM jobs WHERE id = :id"), {"id": job_id})
    )


def device_type(*, session: Session, uuid_: str) -> tuple[str, float] | None:
    """(type, GiB) of a device."""
    row = session.execute(
        text("SELECT gpu_type, memory_bytes FROM devices WHERE uuid = :uuid"), {"uuid": uuid_}
    ).one_or_none()
    return None if row is None else (row.gpu_type, row.memory_bytes / 2**30)


def smallest_gang(*, session: Session, gpu_type: str, window_s: float) -> int | None:
    """The smallest ``gpu_count`` (over 1) of the gang jobs a device of ``gpu_type`` fits that
    were submitted in the last ``window_s`` seconds, queued or not, or None
    (``app.domain.fragmentation``: the gang size a single-GPU job keeps room for). A range of
    ``ix_jobs_created``, never a scan of every queued job; a gang waiting for longer than that
    is protected by its reservation (``GPUFLEET_GANG_HOLD_S``) instead."""
    found: int | None = session.scalar(
        text(
            """
            SELECT min((spec->'resources'->>'gpu_count')::int) FROM jobs
             WHERE created_at > now() - make_interval(secs => :window)
               AND coalesce((spec->'resources'->>'gpu_count')::int, 1) > 1
               AND (spec->'resources'->'gpu_type' IS NULL
                    OR spec->'resources'->'gpu_type' @> to_jsonb(CAST(:any AS text))
                    OR spec->'resources'->'gpu_type' @> to_jsonb(CAST(:type AS text)))
            """
        ),
        {"window": window_s, "any": ANY_TYPE, "type": gpu_type},
    )
    return found
