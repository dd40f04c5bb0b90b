"""The trainer's output, stored in chunks per attempt so any API replica can serve it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.db.leases import FENCE
from app.db.models import JobLog


def append_log(*, session: Session, job_id: uuid.UUID, epoch: int, chunk: str) -> bool:
    """Store a chunk of the trainer's output, fenced like every write of the lease holder: a
    zombie's output never lands on the job now running elsewhere. False if the lease is gone."""
    stored = session.scalar(
        text(
            f"""
            INSERT INTO job_logs (job_id, epoch, chunk)
            SELECT j.id, :epoch, :chunk FROM jobs j WHERE {FENCE}
            RETURNING id
            """
        ),
        {"job_id": job_id, "epoch": epoch, "chunk": chunk},
    )
    return stored is not None


def read_logs(
    *, session: Session, job_id: uuid.UUID, after_id: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(JobLog)
        .where(JobLog.job_id == job_id, JobLog.id > after_id)
        .order_by(JobLog.id)
        .limit(limit)
    )
    return [{"id": r.id, "epoch": r.epoch, "at": r.at.isoformat(), "text": r.chunk} for r in rows]
