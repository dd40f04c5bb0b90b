"""The trainer's output, stored in chunks per attempt so any API replica can serve it.

Chunks carry a per-job, gap-free ``seq``, given by a database trigger under the job's row lock
in the inserting transaction (like events, see ``app.db.events``): the log stream's cursor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

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


@dataclass(frozen=True)
class LogChunk:
    seq: int
    epoch: int
    at: datetime
    text: str


def read_logs(
    *, session: Session, job_id: uuid.UUID, after: int = 0, limit: int = 100
) -> list[LogChunk]:
    """Chunks with ``seq > after``, in order, at most ``limit``."""
    return read_log_page(session=session, job_id=job_id, after=after, limit=limit)[0]


def read_log_page(
    *, session: Session, job_id: uuid.UUID, after: int, limit: int, max_chars: int = 0
) -> tuple[list[LogChunk], bool]:
    """Chunks with ``seq > after``, in order: at most ``limit`` and, with ``max_chars`` > 0,
    no more text than that (but at least one chunk, so a reader always moves on). True when
    more chunks follow."""
    rows = session.execute(
        select(JobLog.seq, JobLog.epoch, JobLog.at, JobLog.chunk)
        .where(JobLog.job_id == job_id, JobLog.seq > after)
        .order_by(JobLog.seq)
        .limit(limit + 1)
    ).all()
    chunks: list[LogChunk] = []
    size = 0
    for r in rows[:limit]:
        size += len(r.chunk)
        if chunks and max_chars and size > max_chars:
            return chunks, True
        chunks.append(LogChunk(seq=r.seq, epoch=r.epoch, at=r.at, text=r.chunk))
    return chunks, len(rows) > limit
