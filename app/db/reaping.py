"""The reaper's statements: take back expired leases, find lost dispatches, free dead devices.

Each is bounded (``LIMIT``) and skips rows another reaper holds (``FOR UPDATE SKIP LOCKED``),
so any number of reapers can run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import counters
from app.db.events import add_event
from app.db.jobs import device_sizes, no_fit_reason
from app.db.leases import FREE_HANDBACKS
from app.domain.routing import split_queues
from app.domain.states import EventKind, JobStatus


@dataclass(frozen=True)
class Dispatchable:
    job_id: uuid.UUID
    queue: str
    priority: int


@dataclass(frozen=True)
class Reaped:
    job_id: uuid.UUID
    epoch: int  #: the epoch of the lease that expired
    status: JobStatus  #: queued again, or failed when its attempts were spent
    queue: str
    priority: int
    #: the expired try counted against max_attempts (False: it died of a database outage).
    counted: bool = True


def reap_expired_leases(
    *,
    session: Session,
    grace: float,
    limit: int,
    outage: tuple[datetime, datetime] | None = None,
) -> list[Reaped]:
    """Close leases expired past ``grace`` and requeue (or fail) their jobs, bumping the epoch so
    the old holder's next write is refused.

    A lease that expired within ``outage`` (database-clock times: the reaper's last good pass
    before it lost the database, and one ``lease_ttl`` after it got it back) died of the outage,
    not of its job: its job goes back without spending an attempt, up to the same cap as a
    worker's hand-backs (``leases.FREE_HANDBACKS``).

    A lease whose job row is locked (its worker, frozen inside a transaction, still holds it
    until the server ends that transaction: ``idle_in_transaction_session_timeout``) is left
    for a later pass rather than waited on.
    """
    free_from, free_until = outage if outage is not None else (None, None)
    rows = session.execute(
        text(
            """
            WITH expired AS (
                SELECT l.id FROM leases l JOIN jobs j ON j.id = l.job_id
                 WHERE l.released_at IS NULL
                   AND l.expires_at < now() - make_interval(secs => :grace)
                 ORDER BY l.expires_at LIMIT :limit
                 FOR UPDATE OF l, j SKIP LOCKED),
            closed AS (
                UPDATE leases l SET released_at = now(), outcome = 'expired'
                  FROM expired WHERE l.id = expired.id
                RETURNING l.job_id, l.epoch,
                          coalesce(l.expires_at BETWEEN :free_from AND :free_until, false)
                              AS in_outage),
            d AS (
                SELECT j.id, closed.epoch,
                       NOT closed.in_outage
                       OR (SELECT count(*) FROM leases WHERE job_id = j.id) - j.attempts >= :cap
                           AS counted
                  FROM jobs j JOIN closed ON j.id = closed.job_id AND j.epoch = closed.epoch
                 WHERE j.status = 'running')
            UPDATE jobs j SET
                   epoch = j.epoch + 1,
                   attempts = j.attempts - CASE WHEN d.counted THEN 0 ELSE 1 END,
                   status = CASE
                       WHEN j.cancel_requested THEN 'cancelled'::job_status
                       WHEN d.counted AND j.attempts >= j.max_attempts THEN 'failed'::job_status
                       ELSE 'queued'::job_status END,
                   finished_at = CASE
                       WHEN j.cancel_requested OR (d.counted AND j.attempts >= j.max_attempts)
                       THEN now() END,
                   error = CASE
                       WHEN j.cancel_requested THEN
                            '{"kind": "cancelled", "message": "cancelled; its worker was lost"}'
                       WHEN NOT d.counted THEN jsonb_build_object(
                            'kind', 'infra',
                            'message', 'the lease of attempt ' || j.attempts ||
                                       ' expired while the database was unreachable; '
                                       'not counted as an attempt')
                       ELSE jsonb_build_object(
                            'kind', 'lost_worker',
                            'message', 'the worker holding attempt ' || j.attempts ||
                                       ' stopped heartbeating') END,
                   dispatched_at = now(), retry_at = NULL
              FROM d
             WHERE j.id = d.id
            RETURNING j.id, d.epoch, j.status, j.queue, j.priority, d.counted
            """
        ),
        {
            "grace": grace,
            "limit": limit,
            "free_from": free_from,
            "free_until": free_until,
            "cap": FREE_HANDBACKS,
        },
    ).all()
    reaped = [
        Reaped(
            job_id=r.id,
            epoch=r.epoch,
            status=JobStatus(r.status),
            queue=r.queue,
            priority=r.priority,
            counted=r.counted,
        )
        for r in rows
    ]
    for r in reaped:
        add_event(
            session=session,
            job_id=r.job_id,
            kind=EventKind.LEASE_EXPIRED,
            epoch=r.epoch,
            message=f"lease of epoch {r.epoch} expired; job {r.status.value}"
            + ("" if r.counted else " (database outage: not counted as an attempt)"),
            data={"status": r.status.value, "counted": r.counted},
        )
    return reaped


def due_per_queue(*, session: Session) -> dict[str, int]:
    """How many queued jobs are due (may run now) in each queue: the queued count of the fleet
    counters less the jobs still waiting out a retry backoff (few, and indexed), so a pass
    costs the same whatever the length of the queues."""
    queued = counters.queued_by_queue(counters.job_counts(session=session))
    waiting = session.execute(
        text(
            """
            SELECT queue, count(*) AS n FROM jobs
             WHERE status = 'queued' AND retry_at > now()
             GROUP BY queue
            """
        )
    ).all()
    for r in waiting:
        for queue in split_queues(r.queue):
            queued[queue] = queued.get(queue, 0) - r.n
    return {queue: n for queue, n in queued.items() if n > 0}


_CLAIM_DUE = """
    UPDATE jobs SET dispatched_at = now()
     WHERE id IN (
        SELECT id FROM jobs
         WHERE status = 'queued' AND NOT cancel_requested {in_queue}
           AND (retry_at IS NULL OR retry_at <= now())
           AND (dispatched_at IS NULL
                OR dispatched_at < now() - make_interval(secs => :after))
         ORDER BY dispatched_at NULLS FIRST, priority DESC, created_at
         LIMIT :limit
         FOR UPDATE SKIP LOCKED)
    RETURNING id, queue, priority
"""


def claim_due_dispatches(
    *, session: Session, redispatch_after: float, limit: int, queue: str | None = None
) -> list[Dispatchable]:
    """Queued jobs that are due and whose wake-up is missing or old; marks them dispatched now.

    This is the outbox: it covers an API that died between commit and dispatch, a retry whose
    backoff has passed, and a broker that lost its messages. Never-dispatched jobs come first,
    then the longest-waiting; ``queue`` narrows it to one queue (and the jobs with alternative
    types that wait in it too).
    """
    # One queue: the ORDER BY is ix_jobs_queued_dispatch's, so LIMIT stops the scan early.
    # Jobs with alternative types wait in several queues at once (their ``queue`` names them
    # all): a second statement claims those through ix_jobs_queued_alternatives, rather than
    # an OR that no index serves in order.
    filters = (
        [""]
        if queue is None
        else [
            "AND queue = :queue",
            "AND strpos(queue, ' ') > 0 AND :queue = ANY(string_to_array(queue, ' '))",
        ]
    )
    rows: list[Any] = []
    for in_queue in filters:
        if len(rows) >= limit:
            break
        rows += session.execute(
            text(_CLAIM_DUE.format(in_queue=in_queue)),
            {"after": redispatch_after, "limit": limit - len(rows), "queue": queue},
        ).all()
    for r in rows:
        add_event(
            session=session,
            job_id=r.id,
            kind=EventKind.REDISPATCHED,
            message=f"wake-up sent again to {r.queue}",
        )
    return [Dispatchable(job_id=r.id, queue=r.queue, priority=r.priority) for r in rows]


def free_dead_devices(*, session: Session, limit: int) -> list[str]:
    """Forget the claims of workers that stopped heartbeating."""
    rows = session.scalars(
        text(
            """
            UPDATE devices SET worker = NULL, current_job = NULL
             WHERE uuid IN (
                SELECT uuid FROM devices
                 WHERE worker IS NOT NULL AND expires_at < now()
                 LIMIT :limit FOR UPDATE SKIP LOCKED)
            RETURNING uuid
            """
        ),
        {"limit": limit},
    ).all()
    return list(rows)


@dataclass(frozen=True)
class Unschedulable:
    job_id: uuid.UUID
    reason: str


def fail_unschedulable(*, session: Session, limit: int) -> list[Unschedulable]:
    """Fail, as ``unschedulable``, the queued jobs with a ``max_wait`` that either waited longer
    than it since submit (before their first start) or that no registered device could ever run
    (with devices registered: an empty fleet is a fleet still starting). Jobs without
    ``max_wait`` wait for ever, as before."""
    rows = session.execute(
        text(
            """
            SELECT id, spec, (spec->>'max_wait')::float AS max_wait,
                   now() - created_at > make_interval(secs => (spec->>'max_wait')::float)
                       AS waited_too_long
              FROM jobs
             WHERE status = 'queued' AND NOT cancel_requested AND started_at IS NULL
               AND jsonb_typeof(spec->'max_wait') = 'number'
             ORDER BY created_at LIMIT :limit
               FOR UPDATE SKIP LOCKED
            """
        ),
        {"limit": limit},
    ).all()
    if not rows:
        return []
    devices = device_sizes(session)
    failed = []
    for r in rows:
        no_fit = no_fit_reason(r.spec, devices) if devices else None
        if r.waited_too_long:
            reason = f"queued longer than max_wait ({r.max_wait:g} s)"
            if no_fit:
                reason += f": {no_fit}"
        elif no_fit:
            reason = f"{no_fit}; it has a max_wait, so it fails rather than wait"
        else:
            continue
        session.execute(
            text(
                """
                UPDATE jobs SET status = 'failed', finished_at = now(),
                       error = jsonb_build_object('kind', 'unschedulable',
                                                  'message', CAST(:reason AS text))
                 WHERE id = :id AND status = 'queued'
                """
            ),
            {"id": r.id, "reason": reason},
        )
        add_event(session=session, job_id=r.id, kind=EventKind.FAILED, message=reason)
        failed.append(Unschedulable(job_id=r.id, reason=reason))
    return failed
