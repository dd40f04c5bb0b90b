"""A job's recorded checkpoints as a resume needs them: where each was written, its hash, and
its key in the store (``app.db.leases.record_checkpoint`` records them, fenced)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class RecordedCheckpoint:
    step: int
    #: where the trainer that wrote it put it (on its host).
    path: str
    sha256: str | None
    #: its key in the store, or None: it stays on the host that wrote it.
    storage_key: str | None


def recorded(*, session: Session, job_id: uuid.UUID) -> list[RecordedCheckpoint]:
    """A job's recorded checkpoints, newest first (the order a resume tries them in)."""
    rows = session.execute(
        text(
            """
            SELECT step, path, sha256, storage_key FROM checkpoints
             WHERE job_id = :job_id ORDER BY step DESC, id DESC
            """
        ),
        {"job_id": job_id},
    ).all()
    return [RecordedCheckpoint(r.step, r.path, r.sha256, r.storage_key) for r in rows]
