"""device health (suspect) and the frameworks a device's worker offers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 14:30:00.000000

TensorFlow jobs move to their own queues (``gpu.<type>.<tier>.tensorflow``, see
``app.domain.routing``): the queue of every job that names tensorflow is renamed with them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TF_SUFFIX = ".tensorflow"


def upgrade() -> None:
    op.add_column("devices", sa.Column("suspect_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("devices", sa.Column("suspect_reason", sa.Text(), nullable=True))
    op.add_column(
        "devices",
        sa.Column("frameworks", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.execute(
        f"UPDATE jobs SET queue = queue || '{_TF_SUFFIX}' "
        f"WHERE spec->>'framework' = 'tensorflow' AND queue NOT LIKE '%{_TF_SUFFIX}'"
    )


def downgrade() -> None:
    op.execute(
        f"UPDATE jobs SET queue = left(queue, -{len(_TF_SUFFIX)}) WHERE queue LIKE '%{_TF_SUFFIX}'"
    )
    op.drop_column("devices", "frameworks")
    op.drop_column("devices", "suspect_reason")
    op.drop_column("devices", "suspect_since")
