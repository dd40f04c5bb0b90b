"""The statements a large fleet issues all the time use indexes, not a scan of every row.

On a database of 100k jobs (queued in three queues, most ended with a lease and events), each
hot statement is run through its real ``app.db`` function; every SQL statement that function
sends is captured and ``EXPLAIN``-ed with the same parameters. A sequential scan of ``jobs``,
``leases`` or ``job_events`` in any plan fails the test, and so does a sort of thousands of rows
(an ORDER BY ... LIMIT without its index), with the plan in the message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from app.db import counters, fleet, jobs, leases, reaping, retention
from app.db.session import engine_for, session_scope
from app.domain.spec import JobSpec
from app.domain.states import EventKind, JobStatus
from tests.conftest import drop_database, new_database, sqlalchemy_url

JOBS = 100_000
QUEUED = 30_000
WATCHED = {"jobs", "leases", "job_events"}
#: a sort of more rows than this means the ORDER BY had no index.
SORT_ROWS = 1000


_SEED = [
    """
            CREATE TEMP TABLE seed AS
            SELECT gen_random_uuid() AS id, g AS n FROM generate_series(1, %(n)s) g
    """,
    """
            INSERT INTO jobs (id, tenant, name, status, spec, queue, priority, spec_hash,
                              max_attempts, dispatched_at, created_at, started_at, finished_at,
                              attempts, epoch, event_seq)
            SELECT s.id, 't' || (s.n %% 50), t.name,
                   CASE WHEN s.n <= %(q)s THEN 'queued'::job_status
                        ELSE 'succeeded'::job_status END,
                   CASE WHEN s.n %% 1000 = 0 THEN t.spec || '{"max_wait": 3600}' ELSE t.spec END,
                   'q' || (s.n %% 3), (s.n %% 3)::smallint, t.spec_hash, 3,
                   now() - make_interval(secs => s.n), now() - make_interval(secs => s.n),
                   CASE WHEN s.n > %(q)s THEN now() END, CASE WHEN s.n > %(q)s THEN now() END,
                   CASE WHEN s.n > %(q)s THEN 1 ELSE 0 END,
                   CASE WHEN s.n > %(q)s THEN 1 ELSE 0 END, 3
              FROM seed s, jobs t WHERE t.id = %(t)s
    """,
    """
            INSERT INTO leases (job_id, epoch, worker, expires_at, released_at, outcome)
            SELECT id, 1, 'w', now(), now(), 'succeeded' FROM seed WHERE n > %(q)s
    """,
    """
            INSERT INTO job_events (job_id, seq, kind, epoch)
            SELECT s.id, k.seq, k.kind, 1 FROM seed s
             CROSS JOIN (VALUES (1, 'submitted'), (2, 'leased'), (3, 'succeeded')) k(seq, kind)
             WHERE s.n > %(q)s OR k.seq = 1
    """,
]


def _seed(url: str) -> None:
    """100k jobs copied from one real submitted job: 30k queued (three queues, a few with a
    max_wait), the rest succeeded, each with a lease and three events."""
    with session_scope(url) as s:
        spec = JobSpec.model_validate({"framework": "torch"})
        template = jobs.submit_job(session=s, tenant="t0", spec=spec).job_id
    # Its own connection: the bulk insert may outlast gpufleet's statement timeout.
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        params = {"n": JOBS, "q": QUEUED, "t": template}
        for statement in _SEED:
            conn.execute(statement, params)
        while True:  # the reaper folds the seeded jobs into the counters
            with session_scope(url) as s:
                if not counters.fold(session=s, limit=20_000):
                    break
        conn.execute("VACUUM ANALYZE")


@dataclass(frozen=True)
class BigDb:
    url: str
    queued: uuid.UUID  #: a queued job
    ended: uuid.UUID  #: a succeeded job


@pytest.fixture(scope="module")
def big_db(template_db: str) -> Iterator[BigDb]:
    name = new_database(template_db)
    url = sqlalchemy_url(name)
    _seed(url)
    with session_scope(url) as s:
        ids = {
            status: s.scalar(
                text("SELECT id FROM jobs WHERE status = CAST(:s AS job_status) LIMIT 1"),
                {"s": status},
            )
            for status in ("queued", "succeeded")
        }
    yield BigDb(url=url, queued=ids["queued"], ended=ids["succeeded"])
    drop_database(name)


def _captured(url: str, call: Callable[[Session], Any]) -> list[tuple[str, Any]]:
    """Every statement ``call`` sends, with its parameters (the call is rolled back)."""
    engine: Engine = engine_for(url)
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn, Session(bind=conn) as session:
            call(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _relations(plan: dict[str, Any]) -> Iterator[str]:
    if "Relation Name" in plan:
        yield plan["Relation Name"]
    for child in plan.get("Plans", []):
        yield from _relations(child)


def _whole_table_work(plan: dict[str, Any]) -> Iterator[str]:
    """Sequential scans of the big tables, and sorts of more than a page of rows (an ORDER BY
    ... LIMIT that no index serves sorts every matching row before it returns the first)."""
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in WATCHED:
        yield f"sequential scan of {plan['Relation Name']}"
    if plan.get("Node Type") in {"Sort", "Incremental Sort"} and plan["Plan Rows"] > SORT_ROWS:
        yield f"sort of ~{plan['Plan Rows']} rows by {plan.get('Sort Key')}"
    for child in plan.get("Plans", []):
        yield from _whole_table_work(child)


HOT: dict[str, Callable[[BigDb], Callable[[Session], Any]]] = {
    "dispatch ordering": lambda db: (
        lambda s: reaping.claim_due_dispatches(
            session=s, redispatch_after=60, limit=100, queue="q1"
        )
    ),
    "due jobs per queue": lambda db: lambda s: reaping.due_per_queue(session=s),
    "expired leases": lambda db: (
        lambda s: reaping.reap_expired_leases(session=s, grace=0, limit=100)
    ),
    "max_wait check": lambda db: lambda s: reaping.fail_unschedulable(session=s, limit=100),
    "retention's batch": lambda db: (
        lambda s: retention.prune_ended(session=s, retention_days=30, limit=100)
    ),
    "event counts": lambda db: (
        lambda s: fleet.event_counts(
            session=s, kinds=[EventKind.LEASE_EXPIRED, EventKind.OOM_BACKOFF]
        )
    ),
    "fleet summary": lambda db: lambda s: fleet.fleet_summary(session=s),
    "tenant counts": lambda db: lambda s: jobs.tenant_counts(session=s, tenant="t7"),
    # A page's waiting reasons read the devices counted per kind, never the jobs' tables.
    "device kinds": lambda db: lambda s: jobs.device_sizes(s),
    "list page of a tenant": lambda db: (
        lambda s: jobs.list_jobs(session=s, tenant="t7", status=None, limit=50, cursor=None)
    ),
    "list page of a tenant by status": lambda db: (
        lambda s: jobs.list_jobs(
            session=s, tenant="t7", status=JobStatus.QUEUED, limit=50, cursor=None
        )
    ),
    "admin list page by status": lambda db: (
        lambda s: jobs.list_jobs(
            session=s, tenant=None, status=JobStatus.RUNNING, limit=50, cursor=None
        )
    ),
    "get a job": lambda db: lambda s: jobs.get_job(session=s, tenant=None, job_id=db.ended),
    "claim": lambda db: (
        lambda s: leases.acquire_lease(
            session=s, job_id=db.queued, worker="w", device_uuid=None, ttl=60
        )
    ),
    "lease heartbeat and progress": lambda db: (
        lambda s: (
            leases.heartbeat(session=s, job_id=db.queued, epoch=0, ttl=60),
            leases.record_progress(session=s, job_id=db.queued, epoch=0, progress={"step": 1}),
        )
    ),
}


#: constant time: these read the fleet counters (or the devices), never the jobs or their history.
NO_HISTORY = {"event counts", "fleet summary", "tenant counts", "device kinds"}


@pytest.mark.parametrize("name", list(HOT))
def test_hot_statement_scans_no_big_table(big_db: BigDb, name: str) -> None:
    # Given 100k jobs and their history, and the statements the hot path sends
    statements = _captured(big_db.url, HOT[name](big_db))
    assert statements, "the call sent nothing"
    raw = engine_for(big_db.url).raw_connection()
    try:
        cur = raw.cursor()
        for statement, params in statements:
            # When Postgres plans each one with the same parameters
            cur.execute("EXPLAIN (FORMAT JSON) " + statement, params)
            plan = cur.fetchone()[0][0]["Plan"]  # type: ignore[index]
            # Then no plan reads a whole jobs, leases or job_events table, or sorts it
            found = list(_whole_table_work(plan))
            if name in NO_HISTORY:
                found += [f"reads {r}" for r in _relations(plan) if r in WATCHED]
            assert not found, (
                f"{name}: {found} in\n{statement}\n{json.dumps(plan, indent=1, default=str)[:4000]}"
            )
        raw.rollback()
    finally:
        raw.close()
