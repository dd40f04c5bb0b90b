"""Device rows: registered by the worker that discovers them, leased like jobs.

A worker claims one device of its host with ``FOR UPDATE SKIP LOCKED`` and keeps it with a
heartbeat; a crashed worker's claim expires and the device frees itself. No session-level
advisory locks: they break behind a connection pooler.
"""

from __future__ import annotations

import uuid
import uuid as uuid_mod
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.models import Device


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


def claim_device(*, session: Session, uuids: list[str], worker: str, ttl: float) -> str | None:
    """Claim the first of ``uuids`` (PCI order) that no live worker holds."""
    claimed: str | None = session.scalar(
        text(
            """
            UPDATE devices SET worker = :worker, claimed_at = now(), heartbeat_at = now(),
                   expires_at = now() + make_interval(secs => :ttl), current_job = NULL
             WHERE uuid = (
                SELECT uuid FROM devices
                 WHERE uuid = ANY(:uuids) AND (worker IS NULL OR expires_at < now())
                 ORDER BY index LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING uuid
            """
        ),
        {"worker": worker, "ttl": ttl, "uuids": uuids},
    )
    return claimed


def holders(*, session: Session, uuids: list[str]) -> dict[str, str | None]:
    """Who holds each device (for the message a waiting worker prints)."""
    rows = session.execute(select(Device.uuid, Device.worker).where(Device.uuid.in_(uuids))).all()
    return {r.uuid: r.worker for r in rows}


def heartbeat_device(*, session: Session, uuid: str, worker: str, ttl: float) -> bool:
    """Extend the claim. False: the claim was lost (expired and taken by another worker)."""
    kept = session.scalar(
        text(
            """
            UPDATE devices SET heartbeat_at = now(),
                   expires_at = now() + make_interval(secs => :ttl)
             WHERE uuid = :uuid AND worker = :worker
            RETURNING uuid
            """
        ),
        {"uuid": uuid, "worker": worker, "ttl": ttl},
    )
    return kept is not None


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
    worker runs on it under a live lease."""
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
           AND EXISTS (SELECT 1 FROM leases l
                        WHERE l.job_id = jobs.id AND l.epoch = jobs.epoch
                          AND l.released_at IS NULL
                          AND l.device_uuid = :uuid AND l.worker = :worker)
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
                   expires_at >= now() AS alive, last_sample, sampled_at, heartbeat_at
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
            "sample": r.last_sample,
            "sampled_at": None if r.sampled_at is None else r.sampled_at.isoformat(),
            "heartbeat_at": None if r.heartbeat_at is None else r.heartbeat_at.isoformat(),
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
