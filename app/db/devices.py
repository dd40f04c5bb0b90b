"""Device rows: registered by the worker that discovers them, leased like jobs.

A worker claims one device of its host with ``FOR UPDATE SKIP LOCKED`` and keeps it with a
heartbeat; a crashed worker's claim expires and the device frees itself. No session-level
advisory locks: they break behind a connection pooler.

The claim records the frameworks the worker offers (``frameworks``). A job that failed with a
GPU or driver fault marks its device suspect (``mark_suspect``); no job starts on a suspect
device (:data:`DEVICE_MAY_START`) until its keeper's health check clears it (``clear_suspect``).
"""

from __future__ import annotations

import logging
import uuid
import uuid as uuid_mod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.models import Device
from app.domain.routing import DEFAULT_FRAMEWORK

log = logging.getLogger(__name__)

#: The most of a reason kept on the row.
MAX_REASON = 2000

#: The condition ``acquire_lease`` adds to its ``UPDATE jobs ... WHERE``: the worker's device
#: (``:device``, NULL without one) is not suspect and offers the job's framework (a device whose
#: worker did not report its frameworks is not refused). It reads the job being won as ``jobs``.
DEVICE_MAY_START = f"""
    NOT EXISTS (
        SELECT 1 FROM devices d
         WHERE d.uuid = CAST(:device AS text)
           AND (d.suspect_since IS NOT NULL
                OR (d.frameworks IS NOT NULL
                    AND d.frameworks -> coalesce(jobs.spec->>'framework',
                                                 '{DEFAULT_FRAMEWORK}') IS NULL)))
"""


@dataclass(frozen=True)
class DeviceRecord:
    uuid: str
    host: str
    index: int
    name: str
    gpu_type: str
    memory_bytes: int
    pci_bus_id: str
    simulated: bool


def register_devices(*, session: Session, devices: list[DeviceRecord]) -> None:
    """Insert or refresh the devices a worker found on its host."""
    for d in devices:
        values = {
            "uuid": d.uuid,
            "host": d.host,
            "index": d.index,
            "name": d.name,
            "gpu_type": d.gpu_type,
            "memory_bytes": d.memory_bytes,
            "pci_bus_id": d.pci_bus_id,
            "simulated": d.simulated,
        }
        stmt = pg_insert(Device).values(**values)
        refreshed = {k: stmt.excluded[k] for k in values if k != "uuid"}
        session.execute(stmt.on_conflict_do_update(index_elements=["uuid"], set_=refreshed))


def claim_device(
    *,
    session: Session,
    uuids: list[str],
    worker: str,
    ttl: float,
    frameworks: Mapping[str, str] | None = None,
) -> str | None:
    """Claim the first of ``uuids`` (PCI order) that no live worker holds, recording the
    frameworks (name -> version) this worker offers."""
    stmt = text(
        """
        UPDATE devices SET worker = :worker, claimed_at = now(), heartbeat_at = now(),
               expires_at = now() + make_interval(secs => :ttl), current_job = NULL,
               frameworks = :frameworks
         WHERE uuid = (
            SELECT uuid FROM devices
             WHERE uuid = ANY(:uuids) AND (worker IS NULL OR expires_at < now())
             ORDER BY index LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING uuid
        """
    ).bindparams(bindparam("frameworks", type_=JSONB(none_as_null=True)))
    claimed: str | None = session.scalar(
        stmt,
        {
            "worker": worker,
            "ttl": ttl,
            "uuids": uuids,
            "frameworks": None if frameworks is None else dict(frameworks),
        },
    )
    return claimed


def holders(*, session: Session, uuids: list[str]) -> dict[str, str | None]:
    """Who holds each device (for the message a waiting worker prints)."""
    rows = session.execute(select(Device.uuid, Device.worker).where(Device.uuid.in_(uuids))).all()
    return {r.uuid: r.worker for r in rows}


def heartbeat_device(*, session: Session, uuid: str, worker: str, ttl: float) -> bool:
    """Extend the claim. False: the claim was lost (expired and taken by another worker)."""
    return renew_claim(session=session, uuid=uuid, worker=worker, ttl=ttl) is not None


def renew_claim(
    *,
    session: Session,
    uuid: str,
    worker: str,
    ttl: float,
    sample: dict[str, Any] | None = None,
) -> Renewal | None:
    """An idle device's one write per heartbeat: extend the claim, store the latest GPU
    ``sample`` (None keeps the last one), and read back whether the device is suspect. None:
    the claim was lost. (A busy device's claim rides on its lease's heartbeat instead.)"""
    row = session.execute(
        text(
            """
            UPDATE devices SET heartbeat_at = now(),
                   expires_at = now() + make_interval(secs => :ttl),
                   last_sample = coalesce(:sample, last_sample),
                   sampled_at = CASE WHEN :sample IS NULL THEN sampled_at ELSE now() END
             WHERE uuid = :uuid AND worker = :worker
            RETURNING suspect_since, suspect_reason
            """
        ).bindparams(bindparam("sample", type_=JSONB(none_as_null=True))),
        {"uuid": uuid, "worker": worker, "ttl": ttl, "sample": sample},
    ).one_or_none()
    if row is None:
        return None
    suspect = (
        None
        if row.suspect_since is None
        else Suspicion(since=row.suspect_since, reason=row.suspect_reason or "")
    )
    return Renewal(suspicion=suspect)


def mark_suspect(*, session: Session, uuid: str, worker: str, reason: str) -> bool:
    """Mark a device suspect after a GPU/driver fault on it (``Failure.device_suspect``).

    True when this marked it; False when it was already suspect (the first reason stays) or is
    not registered. Whoever holds it, no job starts on it until its keeper clears it.
    """
    marked = session.scalar(
        text(
            """
            UPDATE devices SET suspect_since = now(), suspect_reason = :reason
             WHERE uuid = :uuid AND suspect_since IS NULL
            RETURNING uuid
            """
        ),
        {"uuid": uuid, "reason": f"{reason} (reported by {worker})"[:MAX_REASON]},
    )
    if marked is not None:
        log.warning("device %s marked suspect by %s: %s", uuid, worker, reason)
    return marked is not None


@dataclass(frozen=True)
class Suspicion:
    since: datetime
    reason: str


@dataclass(frozen=True)
class Renewal:
    """A renewed claim, and what the renewal read: whether the device is suspect."""

    suspicion: Suspicion | None


def suspicion(*, session: Session, uuid: str) -> Suspicion | None:
    """Why the device is suspect, or None when it is not."""
    row = session.execute(
        select(Device.suspect_since, Device.suspect_reason).where(
            Device.uuid == uuid, Device.suspect_since.is_not(None)
        )
    ).one_or_none()
    if row is None or row.suspect_since is None:
        return None
    return Suspicion(since=row.suspect_since, reason=row.suspect_reason or "")


def clear_suspect(*, session: Session, uuid: str, worker: str, since: datetime) -> bool:
    """Clear the suspicion of ``since`` after the holder's health check passed.

    Only the device's holder clears it, and only the suspicion it checked: a fault reported
    while the check ran keeps the device suspect for the next check.
    """
    cleared = session.scalar(
        text(
            """
            UPDATE devices SET suspect_since = NULL, suspect_reason = NULL
             WHERE uuid = :uuid AND worker = :worker AND suspect_since = :since
            RETURNING uuid
            """
        ),
        {"uuid": uuid, "worker": worker, "since": since},
    )
    return cleared is not None


def device_may_start(*, session: Session, uuid: str | None, job_id: uuid_mod.UUID) -> bool:
    """Whether a job could start on this device now (:data:`DEVICE_MAY_START`, as
    ``acquire_lease`` applies it)."""
    allowed = session.scalar(
        text(f"SELECT {DEVICE_MAY_START} FROM jobs WHERE jobs.id = :job_id"),
        {"device": uuid, "job_id": job_id},
    )
    return bool(allowed)


def release_device(*, session: Session, uuid: str, worker: str) -> None:
    session.execute(
        text(
            "UPDATE devices SET worker = NULL, current_job = NULL, expires_at = NULL "
            "WHERE uuid = :uuid AND worker = :worker"
        ),
        {"uuid": uuid, "worker": worker},
    )


def set_current_job(*, session: Session, uuid: str, worker: str, job_id: uuid.UUID | None) -> None:
    session.execute(
        text("UPDATE devices SET current_job = :job WHERE uuid = :uuid AND worker = :worker"),
        {"uuid": uuid, "worker": worker, "job": job_id},
    )


def record_sample(*, session: Session, uuid: str, worker: str, sample: dict[str, Any]) -> None:
    """Store the latest sample on the device and fold it into the statistics of the job this
    worker runs on it under a live lease, or of the gang that holds it (so a gang's mean
    utilization is over all its devices' samples, its peak memory the largest of any one)."""
    stmt = text(
        """
        WITH d AS (
            UPDATE devices SET last_sample = :sample, sampled_at = now()
             WHERE uuid = :uuid AND worker = :worker
            RETURNING current_job)
        UPDATE jobs SET gpu_util_sum = gpu_util_sum + :util,
               gpu_util_samples = gpu_util_samples + 1,
               gpu_peak_memory_bytes = greatest(gpu_peak_memory_bytes, :mem)
          FROM d
         WHERE jobs.id = d.current_job AND jobs.status = 'running'
           -- fenced: only the job whose live lease of its current epoch runs on this device
           -- under this worker; a zombie's samples never reach a job now running elsewhere.
           AND (EXISTS (SELECT 1 FROM leases l
                         WHERE l.job_id = jobs.id AND l.epoch = jobs.epoch
                           AND l.released_at IS NULL
                           AND l.device_uuid = :uuid AND l.worker = :worker)
                -- or a member of the job's gang of this epoch: a gang's statistics are its
                -- devices' together
                OR EXISTS (SELECT 1 FROM devices g
                            WHERE g.uuid = :uuid AND g.worker = :worker
                              AND g.gang_job = jobs.id AND g.gang_epoch = jobs.epoch))
        """
    ).bindparams(bindparam("sample", type_=JSONB))
    session.execute(
        stmt,
        {
            "uuid": uuid,
            "worker": worker,
            "sample": sample,
            "util": float(sample.get("utilization") or 0.0),
            "mem": int(sample.get("memory_used_bytes") or 0),
        },
    )


def list_devices(*, session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        text(
            """
            SELECT uuid, host, index, name, gpu_type, memory_bytes, pci_bus_id, simulated,
                   CASE WHEN expires_at >= now() THEN worker END AS worker,
                   CASE WHEN expires_at >= now() THEN current_job END AS current_job,
                   gang_job IS NOT NULL AS gang,
                   expires_at >= now() AS alive, last_sample, sampled_at, heartbeat_at,
                   suspect_since, suspect_reason, frameworks
              FROM devices ORDER BY host, index
            """
        )
    ).all()
    return [
        {
            "uuid": r.uuid,
            "host": r.host,
            "index": r.index,
            "name": r.name,
            "type": r.gpu_type,
            "memory_gb": round(r.memory_bytes / 2**30, 2),
            "pci_bus_id": r.pci_bus_id,
            "simulated": r.simulated,
            "worker": r.worker,
            "alive": bool(r.alive),
            "current_job": None if r.current_job is None else str(r.current_job),
            "gang": bool(r.gang),
            "sample": r.last_sample,
            "sampled_at": None if r.sampled_at is None else r.sampled_at.isoformat(),
            "heartbeat_at": None if r.heartbeat_at is None else r.heartbeat_at.isoformat(),
            "suspect": r.suspect_since is not None,
            "suspect_since": None if r.suspect_since is None else r.suspect_since.isoformat(),
            "suspect_reason": r.suspect_reason,
            "frameworks": r.frameworks,
        }
        for r in rows
    ]


def current_job(*, session: Session, uuid: str) -> uuid_mod.UUID | None:
    job: uuid_mod.UUID | None = session.scalar(
        select(Device.current_job).where(Device.uuid == uuid)
    )
    return job


def rename_claim(*, session: Session, uuid: str, old: str, new: str) -> bool:
    renamed = session.scalar(
        text(
            "UPDATE devices SET worker = :new WHERE uuid = :uuid AND worker = :old RETURNING uuid"
        ),
        {"uuid": uuid, "old": old, "new": new},
    )
    return renamed is not None
