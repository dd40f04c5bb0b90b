"""A job's artifacts: the files it left in its output directory, uploaded to the store at its
success and recorded here (fenced by the lease, like every write of a running job)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.leases import FENCE

#: an artifact's name: a relative ``/``-separated path with no empty or ``..`` segment, no
#: control characters or backslashes (the API answers any other with a 404 before a lookup;
#: the worker does not upload a file whose name would not fit).
_CHAR, _FIRST = r"[^/\x00-\x1f\\]", r"[^/.\x00-\x1f\\]"
_SEGMENT = rf"(?:{_FIRST}{_CHAR}*|\.{_FIRST}{_CHAR}*|\.\.{_CHAR}+|\.)"
NAME_PATTERN = rf"^{_SEGMENT}(?:/{_SEGMENT})*$"
MAX_NAME = 1000


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME and re.fullmatch(NAME_PATTERN, name) is not None


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    size: int
    sha256: str
    storage_key: str


def record(
    *, session: Session, job_id: uuid.UUID, epoch: int, artifacts: Sequence[StoredArtifact]
) -> bool:
    """Record uploaded artifacts (a name recorded by an earlier attempt is replaced). False if
    the lease is gone: nothing is recorded."""
    live = session.scalar(
        text(f"SELECT j.id FROM jobs j WHERE {FENCE} FOR SHARE"),
        {"job_id": job_id, "epoch": epoch},
    )
    if live is None:
        return False
    for a in artifacts:
        session.execute(
            text(
                """
                INSERT INTO artifacts (job_id, epoch, name, size, sha256, storage_key)
                VALUES (:job_id, :epoch, :name, :size, :sha256, :key)
                ON CONFLICT (job_id, name) DO UPDATE
                   SET epoch = excluded.epoch, size = excluded.size,
                       sha256 = excluded.sha256, storage_key = excluded.storage_key,
                       created_at = now()
                """
            ),
            {
                "job_id": job_id,
                "epoch": epoch,
                "name": a.name,
                "size": a.size,
                "sha256": a.sha256,
                "key": a.storage_key,
            },
        )
    return True


def list_for(*, session: Session, job_id: uuid.UUID) -> list[StoredArtifact]:
    rows = session.execute(
        text(
            "SELECT name, size, sha256, storage_key FROM artifacts"
            " WHERE job_id = :job_id ORDER BY name"
        ),
        {"job_id": job_id},
    ).all()
    return [StoredArtifact(r.name, r.size, r.sha256, r.storage_key) for r in rows]


def find(*, session: Session, job_id: uuid.UUID, name: str) -> StoredArtifact | None:
    row = session.execute(
        text(
            "SELECT name, size, sha256, storage_key FROM artifacts"
            " WHERE job_id = :job_id AND name = :name"
        ),
        {"job_id": job_id, "name": name},
    ).one_or_none()
    return None if row is None else StoredArtifact(row.name, row.size, row.sha256, row.storage_key)
