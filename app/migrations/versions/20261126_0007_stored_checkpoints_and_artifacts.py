"""checkpoints in the store (sha256, size, key); artifacts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 22:00:00.000000

A checkpoint is recorded once its file is durable: with its sha256 and size, and its key in
the store when ``GPUFLEET_STORAGE_URL`` names one (a resume on another host downloads it and
checks the hash). ``artifacts``: what a job left in its output directory, uploaded at success.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("checkpoints", sa.Column("sha256", sa.String(length=64), nullable=True))
    op.add_column("checkpoints", sa.Column("size", sa.BigInteger(), nullable=True))
    op.add_column("checkpoints", sa.Column("storage_key", sa.Text(), nullable=True))
    op.create_table(
        "artifacts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_artifacts_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
    op.drop_column("checkpoints", "storage_key")
    op.drop_column("checkpoints", "size")
    op.drop_column("checkpoints", "sha256")
