"""gang reservations: a device kept idle for a waiting gang, until a deadline

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 22:15:00.000000

A gang that waits for devices on a host reserves that host's idle devices as they free
(``app.db.gangs.reserve``): single-GPU leases stay off a device reserved for another job until
``reserved_until``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("reserved_for", sa.Uuid(), nullable=True))
    op.add_column("devices", sa.Column("reserved_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("devices", "reserved_until")
    op.drop_column("devices", "reserved_for")
