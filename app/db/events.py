"""Job events: every state change, lease, checkpoint, backoff and retry leaves a row."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select
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


def list_events(
    *, session: Session, job_id: uuid.UUID, after_id: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "kind": e.kind,
            "epoch": e.epoch,
            "message": e.message,
            "data": e.data,
        }
        for e in rows
    ]
