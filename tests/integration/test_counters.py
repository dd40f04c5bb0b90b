"""The fleet counters agree with the jobs and events they count, through every status change,
before and after the reaper folds them."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from app.db import counters, leases, reaping
from app.db.fleet import event_counts, fleet_summary
from app.db.jobs import cancel_job, submit_job, tenant_counts
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import ErrorKind, EventKind, LeaseOutcome
from app.settings import Settings

COUNTED = [EventKind.LEASE_EXPIRED, EventKind.OOM_BACKOFF]


def _truth(url: str) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, int]]:
    with session_scope(url) as s:
        jobs = {
            (r.queue, r.status): r.n
            for r in s.execute(
                text("SELECT queue, status::text, count(*) AS n FROM jobs GROUP BY 1, 2")
            )
        }
        t1 = {
            r.status: r.n
            for r in s.execute(
                text("SELECT status::text, count(*) AS n FROM jobs WHERE tenant = 't1' GROUP BY 1")
            )
        }
        events = {
            r.kind: r.n
            for r in s.execute(
                text("SELECT kind, count(*) AS n FROM job_events WHERE kind = ANY(:k) GROUP BY 1"),
                {"k": [k.value for k in COUNTED]},
            )
        }
    return jobs, t1, events


def _assert_counts_match(url: str) -> None:
    jobs, t1, events = _truth(url)
    with session_scope(url) as s:
        assert counters.job_counts(session=s) == jobs
        summary = fleet_summary(session=s)
        by_status, _ = tenant_counts(session=s, tenant="t1")
        counted = event_counts(session=s, kinds=COUNTED)
    assert {k: v for k, v in summary["jobs"].items() if v} == {
        status: sum(n for (_, st), n in jobs.items() if st == status)
        for status in {st for _, st in jobs}
    }
    assert summary["queues"] == {q: n for (q, st), n in jobs.items() if st == "queued"}
    assert {k: v for k, v in by_status.items() if v} == t1
    assert counted == {k.value: events.get(k.value, 0) for k in COUNTED}


def _fold(url: str) -> int:
    with session_scope(url) as s:
        return counters.fold(session=s, limit=1000)


def test_counters_follow_every_status_change_and_survive_folding(settings: Settings) -> None:
    url = settings.database_url

    def submit(tenant: str, framework: str) -> uuid.UUID:
        """A job in the queue of its framework."""
        spec = JobSpec.model_validate({"framework": framework, "max_attempts": 3})
        with session_scope(url) as s:
            return submit_job(session=s, tenant=tenant, spec=spec).job_id

    def lease(job: uuid.UUID) -> int:
        with session_scope(url) as s:
            grant = leases.acquire_lease(
                session=s, job_id=job, worker="w", device_uuid=None, ttl=60
            )
        assert grant is not None
        return grant.epoch

    # Given jobs of two tenants in two queues, moved through every kind of status change
    a, b, c, d, e = (
        submit("t1", "torch"),
        submit("t1", "tensorflow"),
        submit("t2", "torch"),
        submit("t2", "torch"),
        submit("t1", "torch"),
    )
    _assert_counts_match(url)
    with session_scope(url) as s:
        assert leases.finish(
            session=s, job_id=a, epoch=lease(a), outcome=LeaseOutcome.SUCCEEDED, result={}
        )
    epoch_b = lease(b)
    with session_scope(url) as s:
        leases.requeue_for_retry(
            session=s, job_id=b, epoch=epoch_b, kind=ErrorKind.INFRA, message="x", backoff_s=0
        )
    _assert_counts_match(url)
    # (a fold in between: later deltas add to folded counts)
    assert _fold(url) > 0
    _assert_counts_match(url)
    epoch_c = lease(c)
    with session_scope(url) as s:  # c's worker goes silent: the reaper takes it back
        s.execute(text("UPDATE leases SET expires_at = now() - interval '1 minute'"))
        assert reaping.reap_expired_leases(session=s, grace=0, limit=10)
        leases.record_micro_batch(
            session=s, job_id=d, epoch=0, old=8, new=4, batch_size=8
        )  # refused (d is not running): no event, nothing counted
        cancel_job(session=s, tenant="t2", job_id=d)
    with session_scope(url) as s:
        epoch_e = lease(e)
        assert leases.record_micro_batch(
            session=s, job_id=e, epoch=epoch_e, old=8, new=4, batch_size=8
        )
    assert epoch_c
    # Then every count equals the jobs and events as they are, unfolded and folded
    _assert_counts_match(url)
    assert _fold(url) > 0
    _assert_counts_match(url)
    assert _fold(url) == 0
    with session_scope(url) as s:
        assert s.scalar(text("SELECT count(*) FROM fleet_counter_deltas")) == 0
        assert event_counts(session=s, kinds=COUNTED) == {"lease_expired": 1, "oom_backoff": 1}
