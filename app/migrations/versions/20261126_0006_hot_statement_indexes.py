"""indexes for the statements a large fleet issues all the time

Revision ID: 0006
Revises: 0003
Create Date: 2026-11-26 17:30:00.000000

Each index serves one hot statement (tests/integration/test_query_plans.py EXPLAINs them on
100k jobs): the reaper's outbox (queued jobs per queue in dispatch order, and their count),
its ``max_wait`` check, the lease-expiry and lifecycle event counts, and the job list pages by
tenant and status, newest first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUEUED = sa.text("status = 'queued' AND NOT cancel_requested")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_queued_dispatch",
        "jobs",
        ["queue", sa.text("dispatched_at NULLS FIRST"), sa.text("priority DESC"), "created_at"],
        postgresql_where=_QUEUED,
        postgresql_include=["retry_at"],
    )
    op.create_index(
        "ix_jobs_max_wait",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text(
            "status = 'queued' AND NOT cancel_requested AND started_at IS NULL "
            "AND jsonb_typeof(spec -> 'max_wait') = 'number'"
        ),
    )
    op.create_index(
        "ix_jobs_tenant_status_created", "jobs", ["tenant", "status", "created_at", "id"]
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_index(
        "ix_job_events_counted_kind",
        "job_events",
        ["kind"],
        postgresql_where=sa.text("kind IN ('lease_expired', 'oom_backoff')"),
    )


def downgrade() -> None:
    for name, table in (
        ("ix_job_events_counted_kind", "job_events"),
        ("ix_jobs_created", "jobs"),
        ("ix_jobs_tenant_status_created", "jobs"),
        ("ix_jobs_max_wait", "jobs"),
        ("ix_jobs_queued_dispatch", "jobs"),
    ):
        op.drop_index(name, table_name=table)
