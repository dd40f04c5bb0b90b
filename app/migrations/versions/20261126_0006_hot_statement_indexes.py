"""indexes for the statements a large fleet issues all the time; fleet counters; progress on
the lease row

Revision ID: 0006
Revises: 0003
Create Date: 2026-11-26 17:30:00.000000

Each index serves one hot statement (tests/integration/test_query_plans.py EXPLAINs them on
100k jobs): the reaper's outbox (queued jobs per queue in dispatch order, and their count),
its ``max_wait`` check, and the job list pages by
tenant and status, newest first.

``fleet_counters`` holds the job counts per tenant, queue and status, and the lease-expiry and
OOM-backoff event counts, so ``/metrics`` and ``/v1/fleet`` read a few rows instead of counting
history. Triggers append a +1/-1 row to ``fleet_counter_deltas`` in the transaction that
changes a job's status or inserts a counted event (insert-only: no row lock that every claim
would wait for, no deadlock between two jobs moving in opposite directions); readers add the
deltas to the folded counts, and the reaper folds the deltas in, in bounded batches.

``leases.progress``: the supervisor sends the trainer's progress with its heartbeat, one
narrow-row write per heartbeat instead of rewriting the jobs row (which carries the spec) on
every progress message. ``jobs.progress`` keeps what earlier versions wrote.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUEUED = sa.text("status = 'queued' AND NOT cancel_requested")


def upgrade() -> None:
    op.add_column("leases", sa.Column("progress", postgresql.JSONB(), nullable=True))
    op.create_index(
        "ix_jobs_queued_dispatch",
        "jobs",
        ["queue", sa.text("dispatched_at NULLS FIRST"), sa.text("priority DESC"), "created_at"],
        postgresql_where=_QUEUED,
        postgresql_include=["retry_at"],
    )
    op.create_index(
        "ix_jobs_queued_alternatives",
        "jobs",
        [sa.text("dispatched_at NULLS FIRST"), sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text(f"{_QUEUED.text} AND strpos(queue, ' ') > 0"),
    )
    op.create_index(
        "ix_jobs_retry_waiting",
        "jobs",
        ["queue", "retry_at"],
        postgresql_where=sa.text("status = 'queued' AND retry_at IS NOT NULL"),
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
    _create_counters()


COUNTED_EVENTS = "('lease_expired', 'oom_backoff')"


def _key() -> list[sa.Column[str]]:
    return [
        sa.Column("what", sa.String(20), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(500), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
    ]


def _create_counters() -> None:
    op.create_table(
        "fleet_counters",
        *_key(),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("what", "tenant", "queue", "status", name="pk_fleet_counters"),
    )
    op.create_table(
        "fleet_counter_deltas",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        *_key(),
        sa.Column("delta", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fleet_counter_deltas"),
    )
    op.execute(
        """
        CREATE FUNCTION count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                INSERT INTO fleet_counter_deltas (what, tenant, queue, status, delta)
                VALUES ('job', OLD.tenant, OLD.queue, OLD.status::text, -1);
            END IF;
            IF TG_OP <> 'DELETE' THEN
                INSERT INTO fleet_counter_deltas (what, tenant, queue, status, delta)
                VALUES ('job', NEW.tenant, NEW.queue, NEW.status::text, 1);
            END IF;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER jobs_count AFTER INSERT OR DELETE ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION count_jobs()"
    )
    op.execute(
        "CREATE TRIGGER jobs_count_moves AFTER UPDATE OF status, queue, tenant ON jobs "
        "FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status "
        "OR OLD.queue IS DISTINCT FROM NEW.queue OR OLD.tenant IS DISTINCT FROM NEW.tenant) "
        "EXECUTE FUNCTION count_jobs()"
    )
    op.execute(
        """
        CREATE FUNCTION count_events() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO fleet_counter_deltas (what, tenant, queue, status, delta)
            VALUES ('event', '', '', NEW.kind, 1);
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        f"CREATE TRIGGER job_events_count AFTER INSERT ON job_events "
        f"FOR EACH ROW WHEN (NEW.kind IN {COUNTED_EVENTS}) EXECUTE FUNCTION count_events()"
    )
    op.execute(
        f"""
        INSERT INTO fleet_counters (what, tenant, queue, status, n)
        SELECT 'job', tenant, queue, status::text, count(*) FROM jobs
         GROUP BY tenant, queue, status
        UNION ALL
        SELECT 'event', '', '', kind, count(*) FROM job_events
         WHERE kind IN {COUNTED_EVENTS} GROUP BY kind
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_count ON job_events")
    op.execute("DROP TRIGGER jobs_count_moves ON jobs")
    op.execute("DROP TRIGGER jobs_count ON jobs")
    op.execute("DROP FUNCTION count_events()")
    op.execute("DROP FUNCTION count_jobs()")
    op.drop_table("fleet_counter_deltas")
    op.drop_table("fleet_counters")
    op.drop_column("leases", "progress")
    for name, table in (
        ("ix_jobs_created", "jobs"),
        ("ix_jobs_tenant_status_created", "jobs"),
        ("ix_jobs_max_wait", "jobs"),
        ("ix_jobs_queued_alternatives", "jobs"),
        ("ix_jobs_retry_waiting", "jobs"),
        ("ix_jobs_queued_dispatch", "jobs"),
    ):
        op.drop_index(name, table_name=table)
