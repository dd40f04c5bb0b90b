"""Fleet counts without counting history: jobs per tenant, queue and status, and counted events.

Triggers (migration 0006) append +1/-1 rows to ``fleet_counter_deltas`` in the transaction that
changes a job's status or inserts a counted event; a reader adds those not folded yet to the
folded ``fleet_counters``, in one snapshot, so a count is exact and as fresh as the last commit.
The reaper folds the deltas in (``fold``), so a read costs the number of tenants x queues x
statuses plus the status changes since the last pass, whatever the number of jobs.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.domain.routing import split_queues
from app.domain.states import EventKind, JobStatus

_JOB_COUNTS = """
    SELECT tenant, queue, status, sum(n)::bigint AS n FROM (
        SELECT tenant, queue, status, n FROM fleet_counters WHERE what = 'job' {tenant}
        UNION ALL
        SELECT tenant, queue, status, delta FROM fleet_counter_deltas WHERE what = 'job' {tenant}
    ) c GROUP BY tenant, queue, status
"""


def job_counts(*, session: Session, tenant: str | None = None) -> dict[tuple[str, str], int]:
    """(queue, status) -> jobs, of every tenant or of one."""
    only = "" if tenant is None else "AND tenant = :tenant"
    rows = session.execute(text(_JOB_COUNTS.format(tenant=only)), {"tenant": tenant}).all()
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r.n:
            counts[(r.queue, r.status)] += r.n
    return dict(counts)


def by_status(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    """Every status, with 0 for those no job has."""
    totals = {status.value: 0 for status in JobStatus}
    for (_, status), n in counts.items():
        totals[status] = totals.get(status, 0) + n
    return totals


def queued_by_queue(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    """Queued jobs per queue; a job with alternative types counts in each of its queues."""
    queued: dict[str, int] = defaultdict(int)
    for (stored, status), n in counts.items():
        if status == JobStatus.QUEUED.value:
            for queue in split_queues(stored):
                queued[queue] += n
    return dict(queued)


def event_counts(*, session: Session, kinds: list[EventKind]) -> dict[str, int]:
    """Events of the counted kinds (``lease_expired``, ``oom_backoff``) ever inserted."""
    rows = session.execute(
        text(
            """
            SELECT status AS kind, sum(n)::bigint AS n FROM (
                SELECT status, n FROM fleet_counters WHERE what = 'event'
                UNION ALL
                SELECT status, delta FROM fleet_counter_deltas WHERE what = 'event'
            ) c WHERE status = ANY(:k) GROUP BY status
            """
        ),
        {"k": [k.value for k in kinds]},
    ).all()
    counts = {k.value: 0 for k in kinds}
    counts.update({r.kind: r.n for r in rows})
    return counts


def fold(*, session: Session, limit: int) -> int:
    """Fold up to ``limit`` deltas into the counters (any number of reapers may run it).
    Returns how many were folded."""
    folded: int = session.scalar(
        text(
            """
            WITH moved AS (
                DELETE FROM fleet_counter_deltas WHERE id IN (
                    SELECT id FROM fleet_counter_deltas ORDER BY id LIMIT :limit
                       FOR UPDATE SKIP LOCKED)
                RETURNING what, tenant, queue, status, delta),
            summed AS (
                SELECT what, tenant, queue, status, sum(delta) AS n, count(*) AS rows
                  FROM moved GROUP BY what, tenant, queue, status),
            upserted AS (
                INSERT INTO fleet_counters (what, tenant, queue, status, n)
                SELECT what, tenant, queue, status, n FROM summed
                ON CONFLICT (what, tenant, queue, status)
                DO UPDATE SET n = fleet_counters.n + excluded.n)
            SELECT coalesce(sum(rows), 0) FROM summed
            """
        ),
        {"limit": limit},
    )
    return int(folded)
