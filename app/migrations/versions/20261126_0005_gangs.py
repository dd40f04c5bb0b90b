"""gangs and alternative GPU types: devices held by a gang; a queue per alternative type

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-26 17:30:00.000000

A job whose ``gpu_type`` lists alternatives waits in one queue per type, stored together in
``jobs.queue`` separated by spaces (up to ``MAX_GPU_TYPES`` names of at most 51 characters).
A device held by a gang (``gpu_count`` > 1) names the gang's job and lease epoch.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("gang_job", sa.Uuid(), nullable=True))
    op.add_column("devices", sa.Column("gang_epoch", sa.Integer(), nullable=True))
    op.alter_column(
        "jobs", "queue", type_=sa.String(length=500), existing_type=sa.String(length=100)
    )


def downgrade() -> None:
    op.drop_column("devices", "gang_epoch")
    op.drop_column("devices", "gang_job")
    # a job stored with several queues keeps its first: it still runs, on that type only
    op.execute("UPDATE jobs SET queue = split_part(queue, ' ', 1) WHERE length(queue) > 100")
    op.alter_column(
        "jobs", "queue", type_=sa.String(length=100), existing_type=sa.String(length=500)
    )
