"""Whose a job is, for the worker (a snapshot's key names its tenant: ``app.snapshots``)."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session


def tenant_of(*, session: Session, job_id: uuid.UUID) -> str | None:
    tenant: str | None = session.scalar(
        text("SELECT tenant FROM jobs WHERE id = :job_id"), {"job_id": job_id}
    )
    return tenant
