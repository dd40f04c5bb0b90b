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

Not wired into the worker yet: the leader's supervisor (N ranks) is the next slice, and submit
refuses ``gpu_count`` > 1 until it lands.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.events import add_event
from app.db.leases import checkpoint_paths
from app.domain.routing import ANY_TYPE, MEMORY_TOLERANCE, job_tier, type_list
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


_ACQUIRE = text(
    f"""
    WITH host_devices AS (
        SELECT uuid, index, worker, expires_at, current_job, gang_job, suspect_since,
               gpu_type, memory_bytes, frameworks
          FROM devices WHERE host = :host
         ORDER BY index
           FOR UPDATE),
    job AS (SELECT spec FROM jobs WHERE id = :job_id),
    members AS (
        SELECT d.uuid, d.index FROM host_devices d, job
         WHERE d.worker IS NOT NULL AND d.expires_at > now() AND d.suspect_since IS NULL
           AND d.gang_job IS NULL
           AND (d.uuid = :device AND d.worker = :worker
                OR d.uuid <> :device AND d.current_job IS NULL)
           AND (:any_type OR d.gpu_type = ANY(:types))
           AND d.memory_bytes * {1 + MEMORY_TOLERANCE} >= :tier_bytes
           AND (d.frameworks IS NULL
                OR d.frameworks -> coalesce(job.spec->>'framework', 'torch') IS NOT NULL)
         ORDER BY d.uuid = :device DESC, d.index
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
        UPDATE devices SET gang_job = won.id, gang_epoch = won.epoch, current_job = won.id
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
