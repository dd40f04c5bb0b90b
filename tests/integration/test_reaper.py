"""The reaper on a real Postgres and Redis: requeue and dispatch, and its post-outage grace."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from sqlalchemy import text

from app.db import leases
from app.db.jobs import submit_job
from app.db.session import engine_for, session_scope
from app.domain.spec import JobSpec
from app.queue import Dispatcher
from app.settings import Settings, get_settings
from tests.conftest import with_port
from workers.reaper import Reaper

SPEC = JobSpec.model_validate({"framework": "torch"})


def _running_job_with_expired_lease(settings: Settings) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        job_id = submit_job(session=s, tenant="t", spec=SPEC).job_id
        leases.acquire_lease(session=s, job_id=job_id, worker="w", device_uuid=None, ttl=60)
        s.execute(
            text("UPDATE leases SET expires_at = now() - interval '1 s' WHERE job_id = :j"),
            {"j": job_id},
        )
    return job_id


def _status(settings: Settings, job_id: uuid.UUID) -> str:
    with session_scope(settings.database_url) as s:
        status: str = s.scalar(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id})
        return status


def test_a_pass_requeues_expired_leases_and_sends_their_wake_up(
    settings: Settings, redis_url: str
) -> None:
    job_id = _running_job_with_expired_lease(settings)
    report = Reaper(settings).pass_once()
    assert [r.job_id for r in report.reaped] == [job_id]
    assert _status(settings, job_id) == "queued"
    message = redis.Redis.from_url(redis_url).lpop("gpu.any.8:4")
    assert message is not None and str(job_id).encode() in message


def test_after_losing_the_database_it_reaps_nothing_for_one_lease_ttl(
    settings: Settings,
) -> None:
    # Given a reaper that lost the database (an unreachable server), then got it back
    job_id = _running_job_with_expired_lease(settings)
    reaper = Reaper(settings.model_copy(update={"database_url": _unreachable(settings)}))
    assert reaper.pass_once().reaped == []
    reaper.settings = settings
    # Then it leaves every lease alone while workers get a lease_ttl to renew
    report = reaper.pass_once()
    assert report.quiet and report.reaped == []
    assert _status(settings, job_id) == "running"
    # And reaps as usual once that time has passed
    time.sleep(settings.lease_ttl)
    report = reaper.pass_once()
    assert not report.quiet and [r.job_id for r in report.reaped] == [job_id]


def test_a_job_row_a_frozen_worker_holds_is_left_for_a_later_pass_not_waited_on(
    settings: Settings,
) -> None:
    # Given two expired leases, the job row of one locked by a worker frozen inside a
    # transaction (SIGSTOP mid-write)
    held = _running_job_with_expired_lease(settings)
    free = _running_job_with_expired_lease(settings)
    reaper = Reaper(settings)
    with engine_for(settings.database_url).connect() as frozen:
        frozen.execute(text("SELECT 1 FROM jobs WHERE id = :j FOR UPDATE"), {"j": held})
        # When the reaper passes
        started = time.monotonic()
        report = reaper.pass_once()
        # Then it takes the other job back at once, without waiting on the lock (nor taking
        # a lock timeout for a lost database), and leaves the held one running
        assert [r.job_id for r in report.reaped] == [free]
        assert time.monotonic() - started < settings.db_lock_timeout / 2
        assert _status(settings, held) == "running"
        frozen.rollback()
    # And once the lock is gone (the server ends such a transaction after a lease_ttl), the
    # next pass takes it back, with no post-outage quiet time
    report = reaper.pass_once()
    assert not report.quiet and [r.job_id for r in report.reaped] == [held]


def test_a_lock_timeout_is_not_taken_for_a_lost_database(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reaper whose statements wait on a lock for at most 0.2 s, and the leases table
    # held by another transaction
    job_id = _running_job_with_expired_lease(settings)
    reaper = Reaper(
        settings.model_copy(update={"database_url": _short_lock_wait(monkeypatch, settings)})
    )
    with engine_for(settings.database_url).connect() as other:
        other.execute(text("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE"))
        # When its pass times out on that lock
        reaper.pass_once()
        other.rollback()
    # Then the next pass reaps as usual: no quiet time as after a lost database
    report = reaper.pass_once()
    assert not report.quiet and [r.job_id for r in report.reaped] == [job_id]


def _short_lock_wait(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> str:
    """The same database under another URL (an engine of its own), whose connections wait
    0.2 s on a lock (``GPUFLEET_DB_LOCK_TIMEOUT``, read when that engine is built)."""
    monkeypatch.setenv("GPUFLEET_DB_LOCK_TIMEOUT", "0.2")
    get_settings.cache_clear()
    url = settings.database_url + "?target_session_attrs=any"
    engine_for(url)
    monkeypatch.delenv("GPUFLEET_DB_LOCK_TIMEOUT")
    get_settings.cache_clear()
    return url


def _unreachable(settings: Settings) -> str:
    return with_port(settings.database_url, 1)


def test_it_resends_only_the_wake_ups_the_broker_lost(settings: Settings, redis_url: str) -> None:
    # Given five queued jobs whose wake-ups sit in Redis, all older than redispatch_after
    dispatcher = Dispatcher(settings)
    with session_scope(settings.database_url) as s:
        ids = [submit_job(session=s, tenant="t", spec=SPEC).job_id for _ in range(5)]
    for job_id in ids:
        dispatcher.dispatch(job_id=job_id, queue="gpu.any.8", priority=5)
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE jobs SET dispatched_at = now() - interval '1 hour'"))
    reaper = Reaper(settings, dispatcher)
    # Then a pass sends nothing again: the broker still holds them
    assert reaper.pass_once().dispatched == 0
    # When Redis loses two of them
    client = redis.Redis.from_url(redis_url)
    client.rpop("gpu.any.8:4", 2)
    # Then the next pass sends exactly two, and the broker holds one per job again
    assert reaper.pass_once().dispatched == 2
    assert dispatcher.pending("gpu.any.8") == 5


def test_a_lease_that_expired_during_its_database_outage_costs_no_attempt(
    settings: Settings,
) -> None:
    # Given a reaper that has seen the database, and a job whose lease is about to expire
    reaper = Reaper(settings)
    reaper.pass_once()
    job_id = _running_job_with_expired_lease(settings)
    with session_scope(settings.database_url) as s:
        s.execute(
            text("UPDATE leases SET expires_at = now() + interval '0.5 s' WHERE job_id = :j"),
            {"j": job_id},
        )
    # When the database is unreachable while the lease expires (its worker could not renew)
    reaper.settings = settings.model_copy(update={"database_url": _unreachable(settings)})
    assert reaper.pass_once().reaped == []
    time.sleep(1.0)
    reaper.settings = settings
    assert reaper.pass_once().quiet
    time.sleep(settings.lease_ttl)
    # Then, once the workers had their lease_ttl to renew, the job is requeued without
    # spending its attempt, and says why
    report = reaper.pass_once()
    assert [(r.job_id, r.counted) for r in report.reaped] == [(job_id, False)]
    with session_scope(settings.database_url) as s:
        row = s.execute(
            text("SELECT status, attempts, error FROM jobs WHERE id = :j"), {"j": job_id}
        ).one()
    assert row.status == "queued" and row.attempts == 0
    assert "database was unreachable" in row.error["message"]


def test_a_worker_lost_outside_an_outage_still_spends_its_attempt(settings: Settings) -> None:
    reaper = Reaper(settings)
    reaper.pass_once()
    job_id = _running_job_with_expired_lease(settings)
    report = reaper.pass_once()
    assert [(r.job_id, r.counted) for r in report.reaped] == [(job_id, True)]
    with session_scope(settings.database_url) as s:
        attempts = s.scalar(text("SELECT attempts FROM jobs WHERE id = :j"), {"j": job_id})
    assert attempts == 1


def test_a_job_with_alternative_types_gets_a_wake_up_in_each_queue_again(
    settings: Settings, redis_url: str
) -> None:
    # Given a queued job that can use a V100 or a T4, its wake-ups sent to both queues
    spec = JobSpec.model_validate({"framework": "torch", "resources": {"gpu_type": ["V100", "T4"]}})
    dispatcher = Dispatcher(settings)
    with session_scope(settings.database_url) as s:
        job_id = submit_job(session=s, tenant="t", spec=spec).job_id
        s.execute(text("UPDATE jobs SET dispatched_at = now() - interval '1 hour'"))
    dispatcher.dispatch(job_id=job_id, queue=spec.queue, priority=5)
    assert (dispatcher.pending("gpu.V100.8"), dispatcher.pending("gpu.T4.8")) == (1, 1)
    reaper = Reaper(settings, dispatcher)
    assert reaper.pass_once().dispatched == 0
    # When Redis loses the T4 queue's wake-up
    redis.Redis.from_url(redis_url).delete("gpu.T4.8:4")
    # Then a pass sends the job's wake-ups again, and each of its queues holds one
    assert reaper.pass_once().dispatched == 1
    assert dispatcher.pending("gpu.T4.8") == 1
    assert dispatcher.pending("gpu.V100.8") >= 1
