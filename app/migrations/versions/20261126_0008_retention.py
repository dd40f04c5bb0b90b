"""retention: ended jobs whose history was pruned

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 22:00:00.000000

``jobs.pruned_at``: when the reaper's retention duty (``GPUFLEET_RETENTION_DAYS``) deleted the
ended job's events, logs, leases and older checkpoints; the job row and its summary stay. The
partial index holds only the ended jobs not pruned yet, so the duty's search for due jobs reads
a few index entries whatever the size of the history.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_retention_due",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL AND pruned_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_retention_due", table_name="jobs")
    op.drop_column("jobs", "pruned_at")
