"""Job events: every state change, lease, checkpoint, backoff and retry leaves a row.

Each event gets the job's next ``seq`` in the inserting transaction: a ``BEFORE INSERT``
trigger (migration 0003) runs ``UPDATE jobs SET event_seq = event_seq + 1 ... RETURNING``,
which takes the job's row lock until commit, so two writers of one job number their events one
after the other and commit in that order. A reader that has seen ``seq`` N has seen every event
before it: a stream cursor never skips a row. Being a trigger, it numbers every insert, whoever
writes it (the supervisor's fenced events and log chunks too).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from app.db.models import JobEvent
from app.domain.states import EventKind


def add_event(
    *,
    session: Session,
    job_id: uuid.UUID,
    kind: EventKind,
    message: str = "",
    epoch: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.execute(
        insert(JobEvent).values(
            job_id=job_id, kind=kind.value, message=message, epoch=epoch, data=data
        )
    )


@dataclass(frozen=True)
class EventRow:
    seq: int
    at: datetime
    kind: str
    epoch: int | None
    message: str
    data: dict[str, Any] | None


def list_events(
    *, session: Session, job_id: uuid.UUID, after: int = 0, limit: int = 1000
) -> list[EventRow]:
    """Events with ``seq > after``, in order, at most ``limit``."""
    rows = session.execute(
        select(
            JobEvent.seq,
            JobEvent.at,
            JobEvent.kind,
            JobEvent.epoch,
            JobEvent.message,
            JobEvent.data,
        )
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    ).all()
    return [
        EventRow(seq=r.seq, at=r.at, kind=r.kind, epoch=r.epoch, message=r.message, data=r.data)
        for r in rows
    ]


def events_in(
    *, session: Session, ranges: dict[uuid.UUID, tuple[int, int]]
) -> dict[uuid.UUID, list[EventRow]]:
    """For each job, its events with ``after < seq <= upto``, in order: one statement for
    every job a stream poller follows."""
    if not ranges:
        return {}
    ids = list(ranges)
    rows = session.execute(
        text(
            """
            SELECT e.job_id, e.seq, e.at, e.kind, e.epoch, e.message, e.data
              FROM unnest(CAST(:ids AS uuid[]), CAST(:afters AS bigint[]),
                          CAST(:uptos AS bigint[])) AS r(job_id, after, upto)
              JOIN job_events e ON e.job_id = r.job_id AND e.seq > r.after AND e.seq <= r.upto
             ORDER BY e.job_id, e.seq
            """
        ),
        {
            "ids": ids,
            "afters": [ranges[j][0] for j in ids],
            "uptos": [ranges[j][1] for j in ids],
        },
    ).all()
    found: dict[uuid.UUID, list[EventRow]] = {}
    for r in rows:
        found.setdefault(r.job_id, []).append(
            EventRow(seq=r.seq, at=r.at, kind=r.kind, epoch=r.epoch, message=r.message, data=r.data)
        )
    return found
