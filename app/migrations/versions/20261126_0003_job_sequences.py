"""per-job sequence numbers for events and log chunks; stored spec version

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 14:40:00.000000

A stream's cursor was the BIGSERIAL id, assigned at insert, not at commit: with several writers
on one job, a row with a smaller id could commit after a reader had moved past it, and was then
skipped for ever. ``seq`` is given by a BEFORE INSERT trigger under the job's row lock
(``UPDATE jobs SET event_seq = event_seq + 1 ... RETURNING``) in the inserting transaction, so it
is gap-free and commits in order, whoever inserts the row (an insert that gives ``seq`` itself
keeps it: a new job's first event). Existing rows are numbered in id order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("spec_version", sa.SmallInteger(), server_default="1", nullable=False)
    )
    op.add_column(
        "jobs", sa.Column("event_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column("jobs", sa.Column("log_seq", sa.BigInteger(), server_default="0", nullable=False))
    for table, counter in (("job_events", "event_seq"), ("job_logs", "log_seq")):
        op.add_column(table, sa.Column("seq", sa.BigInteger(), nullable=True))
        op.execute(
            f"""
            UPDATE {table} t SET seq = n.seq
              FROM (SELECT id, row_number() OVER (PARTITION BY job_id ORDER BY id) AS seq
                      FROM {table}) n
             WHERE t.id = n.id
            """
        )
        op.execute(
            f"""
            UPDATE jobs j SET {counter} = m.seq
              FROM (SELECT job_id, max(seq) AS seq FROM {table} GROUP BY job_id) m
             WHERE j.id = m.job_id
            """
        )
        op.alter_column(table, "seq", nullable=False)
        op.create_unique_constraint(op.f(f"uq_{table}_job_id_seq"), table, ["job_id", "seq"])
        op.execute(
            f"""
            CREATE FUNCTION {table}_seq() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.seq IS NULL THEN
                    UPDATE jobs SET {counter} = {counter} + 1 WHERE id = NEW.job_id
                    RETURNING {counter} INTO NEW.seq;
                END IF;
                RETURN NEW;
            END $$
            """
        )
        op.execute(
            f"CREATE TRIGGER {table}_seq BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_seq()"
        )


def downgrade() -> None:
    for table in ("job_logs", "job_events"):
        op.execute(f"DROP TRIGGER {table}_seq ON {table}")
        op.execute(f"DROP FUNCTION {table}_seq()")
        op.drop_constraint(op.f(f"uq_{table}_job_id_seq"), table, type_="unique")
        op.drop_column(table, "seq")
    op.drop_column("jobs", "log_seq")
    op.drop_column("jobs", "event_seq")
    op.drop_column("jobs", "spec_version")
