"""Gang leases: a job of ``gpu_count`` N wins N devices of one host, all or nothing, in one
statement, under one lease epoch.

The worker that received the job's wake-up leads: its own device is always a member, the others
are the lowest-index devices of its host that are claimed by a live worker, not suspect, idle
(``current_job`` NULL), not in another gang, and fit the job's type(s) and memory tier. The
statement locks every device row of the host (in index order, so two leaders never deadlock)
before it chooses, and a single-GPU lease locks and marks its own device row
(``leases.acquire_lease``): whichever commits first, the other sees it on the row it waits for,
so a device is never in a gang and under a single lease at once. Members carry
``gang_job``/``gang_epoch`` until the gang is released: their own workers' leases are refused
meanwhile (they stay out), and ``GET /v1/devices`` shows the gang on each.

The leader's supervisor (``workers.supervisor``) starts the N ranks (``workers.gang``) and
releases the gang when its lease ends; a member's worker that is woken meanwhile hands the
wake-up back and sits out until the gang ends (``workers.gang_member``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.events import add_event
from app.db.leases import LeaseGrant, checkpoint_paths
from app.domain.routing import ANY_TYPE, DEFAULT_FRAMEWORK, MEMORY_TOLERANCE, job_tier, type_list
from app.domain.states import EventKind


@dataclass(frozen=True)
class GangGrant:
    job_id: uuid.UUID
    epoch: int
    attempt: int
    max_attempts: int
    spec: dict[str, Any]
    micro_batch: int | None
    #: the members' device uuids in index order (the leader's among them).
    devices: list[str]
    checkpoints: list[str]

    def as_lease(self) -> LeaseGrant:
        """The lease the leader's supervisor runs, its gang's devices with it."""
        return LeaseGrant(
            job_id=self.job_id,
            epoch=self.epoch,
            attempt=self.attempt,
            max_attempts=self.max_attempts,
            spec=self.spec,
            micro_batch=self.micro_batch,
            checkpoints=self.checkpoints,
            gang=tuple(self.devices),
        )


_ACQUIRE = text(
    f"""
    WITH host_devices AS (
        SELECT uuid, index, worker, expires_at, current_job, gang_job, suspect_since,
               gpu_type, memory_bytes, frameworks, reserved_for, reserved_until
          FROM devices WHERE host = :host
         ORDER BY index
           FOR UPDATE),
    job AS (SELECT spec FROM jobs WHERE id = :job_id),
    members AS (
        SELECT d.uuid, d.index FROM host_devices d, job
         WHERE d.worker IS NOT NULL AND d.expires_at > now() AND d.suspect_since IS NULL
           AND d.gang_job IS NULL
           AND (d.reserved_for IS NULL OR d.reserved_for = :job_id OR d.reserved_until <= now())
           AND (d.uuid = :device AND d.worker = :worker
                OR d.uuid <> :device AND d.current_job IS NULL)
           AND (:any_type OR d.gpu_type = ANY(:types))
           AND d.memory_bytes * {1 + MEMORY_TOLERANCE} >= :tier_bytes
           AND (d.frameworks IS NULL
                OR d.frameworks -> coalesce(job.spec->>'framework', 'torch') IS NOT NULL)
         ORDER BY d.uuid = :device DESC, d.reserved_for IS NOT DISTINCT FROM :job_id DESC,
                  d.index
         LIMIT :n),
    won AS (
        UPDATE jobs SET status = 'running', epoch = epoch + 1,
               attempts = attempts + 1, started_at = coalesce(started_at, now()),
               retry_at = NULL, dispatched_at = NULL
         WHERE id = :job_id AND status = 'queued' AND NOT cancel_requested
           AND (retry_at IS NULL OR retry_at <= now())
           AND (SELECT count(*) FROM members) = :n
           AND EXISTS (SELECT 1 FROM members WHERE uuid = :device)
        RETURNING id, epoch, attempts, max_attempts, spec, micro_batch),
    held AS (
        UPDATE devices SET gang_job = won.id, gang_epoch = won.epoch, current_job = won.id,
               reserved_for = NULL, reserved_until = NULL
          FROM won
         WHERE devices.uuid IN (SELECT uuid FROM members)
        RETURNING devices.uuid, devices.index)
    INSERT INTO leases (job_id, epoch, worker, device_uuid, acquired_at, heartbeat_at,
                        expires_at)
    SELECT id, epoch, :worker, :device, now(), now(), now() + make_interval(secs => :ttl)
      FROM won
    RETURNING epoch,
              (SELECT attempts FROM won) AS attempts,
              (SELECT max_attempts FROM won) AS max_attempts,
              (SELECT spec FROM won) AS spec,
              (SELECT micro_batch FROM won) AS micro_batch,
              (SELECT array_agg(uuid ORDER BY index) FROM held) AS devices
    """
)


def acquire_gang(
    *,
    session: Session,
    job_id: uuid.UUID,
    worker: str,
    device_uuid: str,
    host: str,
    gpu_count: int,
    gpu_type: str | list[str],
    memory_gb: float,
    ttl: float,
) -> GangGrant | None:
    """Win the job and ``gpu_count`` devices of ``host`` (``device_uuid``, the leader's, among
    them), or nothing: None when the job is not queued and due, or the host has too few free
    fitting devices now."""
    types = type_list(gpu_type)
    row = session.execute(
        _ACQUIRE,
        {
            "job_id": job_id,
            "worker": worker,
            "device": device_uuid,
            "host": host,
            "n": gpu_count,
            "any_type": ANY_TYPE in types,
            "types": types,
            "tier_bytes": job_tier(memory_gb) * 2**30,
            "ttl": ttl,
        },
    ).one_or_none()
    if row is None:
        return None
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.LEASED,
        epoch=row.epoch,
        message=f"attempt {row.attempts} on {worker}, a gang of {gpu_count} on {host}",
        data={
            "worker": worker,
            "device": device_uuid,
            "attempt": row.attempts,
            "gang": list(row.devices),
        },
    )
    return GangGrant(
        job_id=job_id,
        epoch=row.epoch,
        attempt=row.attempts,
        max_attempts=row.max_attempts,
        spec=row.spec,
        micro_batch=row.micro_batch,
        devices=list(row.devices),
        checkpoints=checkpoint_paths(session=session, job_id=job_id),
    )


def release_gang(*, session: Session, job_id: uuid.UUID, epoch: int) -> list[str]:
    """Give back the devices of the gang of ``job_id``'s lease ``epoch`` (after its end)."""
    rows = session.scalars(
        text(
            """
            UPDATE devices SET gang_job = NULL, gang_epoch = NULL, current_job = NULL
             WHERE gang_job = :job_id AND gang_epoch = :epoch
            RETURNING uuid
            """
        ),
        {"job_id": job_id, "epoch": epoch},
    ).all()
    return list(rows)


def free_ended_gangs(*, session: Session, limit: int) -> list[str]:
    """The reaper's duty: free devices whose gang's lease is no longer live (the leader died
    before releasing them, or its lease was reaped)."""
    rows = session.scalars(
        text(
            """
            UPDATE devices SET gang_job = NULL, gang_epoch = NULL, current_job = NULL
             WHERE uuid IN (
                SELECT d.uuid FROM devices d
                 WHERE d.gang_job IS NOT NULL
                   AND NOT EXISTS (
                       SELECT 1 FROM leases l
                        WHERE l.job_id = d.gang_job AND l.epoch = d.gang_epoch
                          AND l.released_at IS NULL)
                 LIMIT :limit FOR UPDATE SKIP LOCKED)
            RETURNING uuid
            """
        ),
        {"limit": limit},
    ).all()
    return list(rows)


@dataclass(frozen=True)
class GangRequest:
    """What a queued job of several GPUs asks for (read before leading its gang)."""

    gpu_count: int
    gpu_type: str | list[str]
    memory_gb: float
    queue: str
    priority: int
    framework: str


def gang_request(*, session: Session, job_id: uuid.UUID) -> GangRequest | None:
    """The job's request if it is queued, not cancelled, and asks for more than one GPU."""
    row = session.execute(
        text(
            """
            SELECT (spec->'resources'->>'gpu_count')::int AS gpu_count,
                   spec->'resources'->'gpu_type' AS gpu_type,
                   (spec->'resources'->>'memory_gb')::float AS memory_gb, queue, priority,
                   coalesce(spec->>'framework', :framework) AS framework
              FROM jobs
             WHERE id = :job_id AND status = 'queued' AND NOT cancel_requested
               AND (retry_at IS NULL OR retry_at <= now())
               AND coalesce((spec->'resources'->>'gpu_count')::int, 1) > 1
            """
        ),
        {"job_id": job_id, "framework": DEFAULT_FRAMEWORK},
    ).one_or_none()
    if row is None:
        return None
    gpu_type = row.gpu_type if row.gpu_type is not None else ANY_TYPE
    return GangRequest(
        gpu_count=row.gpu_count,
        gpu_type=gpu_type,
        memory_gb=row.memory_gb if row.memory_gb is not None else 8.0,
        queue=row.queue,
        priority=row.priority,
        framework=row.framework,
    )


@dataclass(frozen=True)
class Membership:
    """A device held by a gang: the gang's job and epoch, and the worker that leads it."""

    job_id: uuid.UUID
    epoch: int
    leader: str | None


def membership(*, session: Session, device_uuid: str) -> Membership | None:
    """The gang holding ``device_uuid``, or None."""
    row = session.execute(
        text(
            """
            SELECT d.gang_job, d.gang_epoch, l.worker FROM devices d
              LEFT JOIN leases l ON l.job_id = d.gang_job AND l.epoch = d.gang_epoch
             WHERE d.uuid = :device AND d.gang_job IS NOT NULL
            """
        ),
        {"device": device_uuid},
    ).one_or_none()
    if row is None:
        return None
    return Membership(job_id=row.gang_job, epoch=row.gang_epoch, leader=row.worker)


#: a device row fits the job of ``_fit_params`` (type, memory tier, framework).
_FITS = f"""(:any_type OR gpu_type = ANY(:types))
               AND memory_bytes * {1 + MEMORY_TOLERANCE} >= :tier_bytes
               AND (frameworks IS NULL OR frameworks -> CAST(:framework AS text) IS NOT NULL)"""


def _fit_params(gpu_type: str | list[str], memory_gb: float, framework: str) -> dict[str, Any]:
    types = type_list(gpu_type)
    return {
        "any_type": ANY_TYPE in types,
        "types": types,
        "tier_bytes": job_tier(memory_gb) * 2**30,
        "framework": framework,
    }


def free_fitting_per_host(
    *,
    session: Session,
    gpu_type: str | list[str],
    memory_gb: float,
    framework: str,
    job_id: uuid.UUID | None = None,
) -> dict[str, int]:
    """Per host, how many live, idle, healthy devices outside any gang, and not reserved for
    another job than ``job_id``, fit a job now (the devices a gang could win there now)."""
    rows = session.execute(
        text(
            f"""
            SELECT host, count(*) AS free FROM devices
             WHERE worker IS NOT NULL AND expires_at > now() AND suspect_since IS NULL
               AND gang_job IS NULL AND current_job IS NULL
               AND (reserved_for IS NULL OR reserved_until <= now()
                    OR reserved_for = CAST(:job_id AS uuid))
               AND {_FITS}
             GROUP BY host
            """
        ),
        {**_fit_params(gpu_type, memory_gb, framework), "job_id": job_id},
    ).all()
    return {r.host: r.free for r in rows}


def live_fitting_per_host(
    *, session: Session, gpu_type: str | list[str], memory_gb: float, framework: str
) -> dict[str, int]:
    """Per host, how many devices held by live workers fit a job, busy or not: the hosts
    where a gang of that many could start once their jobs end."""
    rows = session.execute(
        text(
            f"""
            SELECT host, count(*) AS live FROM devices
             WHERE worker IS NOT NULL AND expires_at > now() AND suspect_since IS NULL
               AND {_FITS}
             GROUP BY host
            """
        ),
        _fit_params(gpu_type, memory_gb, framework),
    ).all()
    return {r.host: r.live for r in rows}


def reserve(
    *,
    session: Session,
    job_id: uuid.UUID,
    device_uuid: str,
    host: str,
    gpu_count: int,
    gpu_type: str | list[str],
    memory_gb: float,
    framework: str,
    ttl: float,
) -> list[str]:
    """Keep ``gpu_count`` fitting devices of ``host`` for the waiting gang of ``job_id`` for
    ``ttl`` seconds more: the holder's own (``device_uuid``), then idle ones, then busy ones
    (they finish their job; no single-GPU lease starts on them after it). The holder renews
    while it waits; devices it no longer picks are let go. Returns the reserved devices."""
    types = type_list(gpu_type)
    return list(
        session.scalars(
            text(
                f"""
                WITH pick AS (
                    SELECT uuid FROM devices
                     WHERE host = :host AND worker IS NOT NULL AND expires_at > now()
                       AND suspect_since IS NULL AND gang_job IS NULL
                       AND (reserved_for IS NULL OR reserved_until <= now()
                            OR reserved_for = :job_id)
                       AND (:any_type OR gpu_type = ANY(:types))
                       AND memory_bytes * {1 + MEMORY_TOLERANCE} >= :tier_bytes
                       AND (frameworks IS NULL
                            OR frameworks -> CAST(:framework AS text) IS NOT NULL)
                     ORDER BY uuid = :device DESC, current_job IS NULL DESC, index
                     LIMIT :n
                       FOR UPDATE),
                dropped AS (
                    UPDATE devices SET reserved_for = NULL, reserved_until = NULL
                     WHERE reserved_for = :job_id AND uuid NOT IN (SELECT uuid FROM pick))
                UPDATE devices SET reserved_for = :job_id,
                       reserved_until = now() + make_interval(secs => :ttl)
                 WHERE uuid IN (SELECT uuid FROM pick)
                RETURNING uuid
                """
            ),
            {
                "job_id": job_id,
                "device": device_uuid,
                "host": host,
                "n": gpu_count,
                "ttl": ttl,
                "any_type": ANY_TYPE in types,
                "types": types,
                "tier_bytes": job_tier(memory_gb) * 2**30,
                "framework": framework,
            },
        ).all()
    )


def unreserve(*, session: Session, job_id: uuid.UUID) -> None:
    """Give back every device reserved for ``job_id``."""
    session.execute(
        text(
            "UPDATE devices SET reserved_for = NULL, reserved_until = NULL"
            " WHERE reserved_for = :job_id"
        ),
        {"job_id": job_id},
    )


def reserved_for_other(*, session: Session, device_uuid: str) -> uuid.UUID | None:
    """The waiting gang's job that ``device_uuid`` is kept idle for now, or None."""
    found: uuid.UUID | None = session.scalar(
        text(
            "SELECT reserved_for FROM devices"
            " WHERE uuid = :device AND reserved_for IS NOT NULL AND reserved_until > now()"
        ),
        {"device": device_uuid},
    )
    return found


def queued_wakeup(*, session: Session, job_id: uuid.UUID) -> tuple[str, int] | None:
    """(queue, priority) of a job still queued: where a handed-back wake-up goes."""
    row = session.execute(
        text(
            "SELECT queue, priority FROM jobs"
            " WHERE id = :job_id AND status = 'queued' AND NOT cancel_requested"
        ),
        {"job_id": job_id},
    ).one_or_none()
    return None if row is None else (row.queue, row.priority)
