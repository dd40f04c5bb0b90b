"""The lease invariants, on a real Postgres: one holder, fenced writes, reaping, device claims."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from app.db import devices as device_rows
from app.db import leases, reaping
from app.db.jobs import cancel_job, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import ErrorKind, JobStatus, LeaseOutcome
from app.settings import Settings
from tests.conftest import device_record

SPEC = JobSpec.model_validate({"framework": "torch", "max_attempts": 2})


def _submit(settings: Settings, spec: JobSpec = SPEC) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=spec).job_id


def _acquire(settings: Settings, job_id: uuid.UUID, worker: str = "w1") -> leases.LeaseGrant | None:
    with session_scope(settings.database_url) as s:
        return leases.acquire_lease(
            session=s, job_id=job_id, worker=worker, device_uuid=None, ttl=settings.lease_ttl
        )


def _expire(settings: Settings, job_id: uuid.UUID) -> None:
    """Make the live lease look long expired (as if its worker went silent)."""
    with session_scope(settings.database_url) as s:
        s.execute(
            text(
                "UPDATE leases SET expires_at = now() - interval '1 minute' "
                "WHERE job_id = :j AND released_at IS NULL"
            ),
            {"j": job_id},
        )


def _reap(settings: Settings) -> list[reaping.Reaped]:
    with session_scope(settings.database_url) as s:
        return reaping.reap_expired_leases(session=s, grace=0, limit=100)


def _status(settings: Settings, job_id: uuid.UUID) -> tuple[str, int, int]:
    with session_scope(settings.database_url) as s:
        row = s.execute(
            text("SELECT status, attempts, epoch FROM jobs WHERE id = :j"), {"j": job_id}
        ).one()
        return row.status, row.attempts, row.epoch


def test_two_workers_never_hold_one_job(settings: Settings) -> None:
    # Given one queued job and eight workers racing for it
    job_id = _submit(settings)
    grants: list[leases.LeaseGrant | None] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        grants.append(_acquire(settings, job_id, worker=f"w{n}"))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one wins, and the database holds exactly one live lease
    assert sum(g is not None for g in grants) == 1
    with session_scope(settings.database_url) as s:
        live = s.scalar(
            text("SELECT count(*) FROM leases WHERE job_id = :j AND released_at IS NULL"),
            {"j": job_id},
        )
    assert live == 1


def test_schema_refuses_a_second_live_lease(settings: Settings) -> None:
    job_id = _submit(settings)
    grant = _acquire(settings, job_id)
    assert grant is not None
    with (
        pytest.raises(IntegrityError, match="uq_leases_one_live_per_job"),
        session_scope(settings.database_url) as s,
    ):
        s.execute(
            text(
                "INSERT INTO leases (job_id, epoch, worker, expires_at) "
                "VALUES (:j, :e, 'intruder', now() + interval '1 minute')"
            ),
            {"j": job_id, "e": grant.epoch + 1},
        )


def test_reaped_lease_fences_every_write_of_the_old_holder(settings: Settings) -> None:
    # Given a job whose worker went silent and was reaped
    job_id = _submit(settings)
    old = _acquire(settings, job_id)
    assert old is not None
    _expire(settings, job_id)
    reaped = _reap(settings)
    assert [(r.job_id, r.status) for r in reaped] == [(job_id, JobStatus.QUEUED)]
    new = _acquire(settings, job_id, worker="w2")
    assert new is not None and new.epoch > old.epoch
    # Then every write naming the old epoch is refused
    url, e = settings.database_url, old.epoch
    with session_scope(url) as s:
        assert leases.heartbeat(session=s, job_id=job_id, epoch=e, ttl=5) is None
        assert not leases.record_progress(session=s, job_id=job_id, epoch=e, progress={"step": 9})
        assert (
            leases.record_checkpoint(session=s, job_id=job_id, epoch=e, step=9, path="x", keep=3)
            is None
        )
        assert not leases.finish(
            session=s, job_id=job_id, epoch=e, outcome=LeaseOutcome.SUCCEEDED, result={}
        )
    # And the new holder's writes go through
    with session_scope(url) as s:
        assert leases.heartbeat(session=s, job_id=job_id, epoch=new.epoch, ttl=5) == leases.Beat(
            cancel_requested=False, device_held=True
        )
        assert leases.finish(
            session=s, job_id=job_id, epoch=new.epoch, outcome=LeaseOutcome.SUCCEEDED, result={}
        )
    assert _status(settings, job_id)[:2] == ("succeeded", 2)


def test_reaper_fails_a_job_whose_attempts_are_spent(settings: Settings) -> None:
    job_id = _submit(settings)  # max_attempts 2
    for _ in range(2):
        assert _acquire(settings, job_id) is not None
        _expire(settings, job_id)
        _reap(settings)
    status, attempts, _ = _status(settings, job_id)
    assert (status, attempts) == ("failed", 2)
    with session_scope(settings.database_url) as s:
        outcomes = s.scalars(
            text("SELECT outcome FROM leases WHERE job_id = :j ORDER BY epoch"), {"j": job_id}
        ).all()
        error = s.scalar(text("SELECT error FROM jobs WHERE id = :j"), {"j": job_id})
    assert outcomes == ["expired", "expired"]
    assert error["kind"] == ErrorKind.LOST_WORKER.value


def test_cancel_queued_at_once_and_running_through_the_heartbeat(settings: Settings) -> None:
    queued = _submit(settings)
    running = _submit(settings)
    grant = _acquire(settings, running)
    assert grant is not None
    with session_scope(settings.database_url) as s:
        assert cancel_job(session=s, tenant="t", job_id=queued) == JobStatus.CANCELLED
        assert cancel_job(session=s, tenant="t", job_id=running) == JobStatus.RUNNING
    assert _acquire(settings, queued) is None
    with session_scope(settings.database_url) as s:
        beat = leases.heartbeat(session=s, job_id=running, epoch=grant.epoch, ttl=5)
    assert beat is not None and beat.cancel_requested


def _give_back(
    settings: Settings,
    job_id: uuid.UUID,
    epoch: int,
    *,
    count_attempt: bool = True,
    backoff_s: float = 0,
) -> JobStatus | None:
    with session_scope(settings.database_url) as s:
        return leases.requeue_for_retry(
            session=s,
            job_id=job_id,
            epoch=epoch,
            kind=ErrorKind.INFRA,
            message="trainer crashed",
            backoff_s=backoff_s,
            count_attempt=count_attempt,
        )


def test_retry_waits_for_its_backoff_then_is_dispatched(settings: Settings) -> None:
    job_id = _submit(settings)
    grant = _acquire(settings, job_id)
    assert grant is not None
    assert _give_back(settings, job_id, grant.epoch, backoff_s=3600) == JobStatus.QUEUED
    assert _acquire(settings, job_id) is None  # not due yet
    with session_scope(settings.database_url) as s:
        assert reaping.claim_due_dispatches(session=s, redispatch_after=0.0, limit=10) == []
        s.execute(text("UPDATE jobs SET retry_at = now() WHERE id = :j"), {"j": job_id})
    with session_scope(settings.database_url) as s:
        due = reaping.claim_due_dispatches(session=s, redispatch_after=0.0, limit=10)
    assert [d.job_id for d in due] == [job_id]
    assert _acquire(settings, job_id) is not None


def test_a_job_given_back_after_a_cancel_request_ends_cancelled_not_queued(
    settings: Settings,
) -> None:
    # Given a running job a user asked to cancel, before its supervisor's next heartbeat
    job_id = _submit(settings)
    grant = _acquire(settings, job_id)
    assert grant is not None
    with session_scope(settings.database_url) as s:
        assert cancel_job(session=s, tenant="t", job_id=job_id) == JobStatus.RUNNING
    # When the attempt fails in a way that would be retried
    assert _give_back(settings, job_id, grant.epoch) == JobStatus.CANCELLED
    # Then the job is cancelled (a queued job with a pending cancel would wait forever: nothing
    # leases it, nothing dispatches it), and so is its lease
    assert _status(settings, job_id)[0] == "cancelled"
    with session_scope(settings.database_url) as s:
        outcome = s.scalar(text("SELECT outcome FROM leases WHERE job_id = :j"), {"j": job_id})
    assert outcome == "cancelled"


def test_a_handed_back_try_does_not_count_against_max_attempts(settings: Settings) -> None:
    job_id = _submit(settings)  # max_attempts 2
    for _ in range(3):  # three drains in a row
        grant = _acquire(settings, job_id)
        assert grant is not None and grant.attempt == 1
        assert _give_back(settings, job_id, grant.epoch, count_attempt=False) == JobStatus.QUEUED
    # the leases are all in the history; the budget is untouched
    grant = _acquire(settings, job_id)
    assert grant is not None and grant.attempt == 1
    assert _give_back(settings, job_id, grant.epoch) == JobStatus.QUEUED
    grant = _acquire(settings, job_id)
    assert grant is not None and grant.attempt == 2
    assert _give_back(settings, job_id, grant.epoch) == JobStatus.FAILED
    with session_scope(settings.database_url) as s:
        kinds = s.scalars(
            text("SELECT kind FROM job_events WHERE job_id = :j ORDER BY id"), {"j": job_id}
        ).all()
        leases_held = s.scalar(text("SELECT count(*) FROM leases WHERE job_id = :j"), {"j": job_id})
    assert kinds.count("handed_back") == 3 and leases_held == 5


def test_checkpoints_beyond_the_last_n_are_returned_for_deletion(settings: Settings) -> None:
    job_id = _submit(settings)
    grant = _acquire(settings, job_id)
    assert grant is not None
    stale_all: list[leases.StaleCheckpoint] = []
    with session_scope(settings.database_url) as s:
        for step in (10, 20, 30, 40):
            stale = leases.record_checkpoint(
                session=s, job_id=job_id, epoch=grant.epoch, step=step, path=f"s{step}", keep=2
            )
            assert stale is not None
            stale_all += stale
        assert leases.checkpoint_paths(session=s, job_id=job_id) == ["s40", "s30"]
    assert [old.path for old in stale_all] == ["s10", "s20"]


def test_three_claimers_two_devices(settings: Settings) -> None:
    url = settings.database_url
    uuids = ["GPU-a", "GPU-b"]
    with session_scope(url) as s:
        device_rows.register_devices(
            session=s, devices=[device_record(u, index=i) for i, u in enumerate(uuids)]
        )
    claims = []
    for worker in ("w1", "w2", "w3"):
        with session_scope(url) as s:
            claims.append(device_rows.claim_device(session=s, uuids=uuids, worker=worker, ttl=60))
    assert sorted(c for c in claims if c) == uuids and claims[2] is None
    # When the first worker's claim expires, the waiting one gets its device
    with session_scope(url) as s:
        s.execute(text("UPDATE devices SET expires_at = now() - interval '1 s' WHERE worker='w1'"))
    with session_scope(url) as s:
        assert device_rows.claim_device(session=s, uuids=uuids, worker="w3", ttl=60) == claims[0]
        assert not device_rows.heartbeat_device(session=s, uuid=uuids[0], worker="w1", ttl=60)


def test_the_heartbeat_says_when_the_lease_s_device_was_claimed_by_another_worker(
    settings: Settings,
) -> None:
    # Given a job leased on a device its worker has claimed
    url = settings.database_url
    with session_scope(url) as s:
        device_rows.register_devices(session=s, devices=[device_record("GPU-a")])
        assert device_rows.claim_device(session=s, uuids=["GPU-a"], worker="w1", ttl=60)
    job_id = _submit(settings)
    with session_scope(url) as s:
        grant = leases.acquire_lease(
            session=s, job_id=job_id, worker="w1", device_uuid="GPU-a", ttl=60
        )
    assert grant is not None

    def beat() -> leases.Beat | None:
        with session_scope(url) as s:
            return leases.heartbeat(session=s, job_id=job_id, epoch=grant.epoch, ttl=60)

    # (and its heartbeat renews the device claim: the keeper need not)
    assert beat() == leases.Beat(cancel_requested=False, device_held=True, device_renewed=True)
    # When the claim expires and another worker takes the GPU
    with session_scope(url) as s:
        s.execute(text("UPDATE devices SET expires_at = now() - interval '1 s'"))
        assert device_rows.claim_device(session=s, uuids=["GPU-a"], worker="w2", ttl=60)
    # Then the lease still renews (the job is w1's) but says the device is gone, and leaves
    # w2's claim alone
    assert beat() == leases.Beat(cancel_requested=False, device_held=False, device_renewed=False)


def test_past_the_cap_a_hand_back_counts_so_a_job_stopped_over_and_over_still_ends(
    settings: Settings,
) -> None:
    job_id = _submit(settings)  # max_attempts 2
    # Given a job whose workers were stopped FREE_HANDBACKS times, none counted
    for _ in range(leases.FREE_HANDBACKS):
        grant = _acquire(settings, job_id)
        assert grant is not None and grant.attempt == 1
        assert _give_back(settings, job_id, grant.epoch, count_attempt=False) == JobStatus.QUEUED
    # When it is handed back twice more
    grant = _acquire(settings, job_id)
    assert grant is not None
    assert _give_back(settings, job_id, grant.epoch, count_attempt=False) == JobStatus.QUEUED
    grant = _acquire(settings, job_id)
    assert grant is not None and grant.attempt == 2
    # Then each counted, and its attempts spent, the job ends
    assert _give_back(settings, job_id, grant.epoch, count_attempt=False) == JobStatus.FAILED
    with session_scope(settings.database_url) as s:
        messages = s.scalars(
            text("SELECT message FROM job_events WHERE job_id = :j AND kind = 'handed_back'"),
            {"j": job_id},
        ).all()
    assert len(messages) == leases.FREE_HANDBACKS + 1
    assert "counted as an attempt" in messages[-1] and "not counted" in messages[0]


def test_a_zombie_s_output_and_gpu_samples_never_reach_the_job_now_running_elsewhere(
    settings: Settings,
) -> None:
    from app.db.logs import append_log

    url = settings.database_url
    with session_scope(url) as s:
        device_rows.register_devices(
            session=s, devices=[device_record("GPU-a"), device_record("GPU-b", index=1)]
        )
        assert device_rows.claim_device(session=s, uuids=["GPU-a"], worker="w1", ttl=60)
        assert device_rows.claim_device(session=s, uuids=["GPU-b"], worker="w2", ttl=60)
    # Given a job that w1 ran on GPU-a, until it froze and the job was taken over by w2 on GPU-b
    job_id = _submit(settings)
    with session_scope(url) as s:
        old = leases.acquire_lease(
            session=s, job_id=job_id, worker="w1", device_uuid="GPU-a", ttl=60
        )
        assert old is not None
        device_rows.set_current_job(session=s, uuid="GPU-a", worker="w1", job_id=job_id)
    _expire(settings, job_id)
    _reap(settings)
    with session_scope(url) as s:
        new = leases.acquire_lease(
            session=s, job_id=job_id, worker="w2", device_uuid="GPU-b", ttl=60
        )
        assert new is not None
        device_rows.set_current_job(session=s, uuid="GPU-b", worker="w2", job_id=job_id)
    sample = {"utilization": 90.0, "memory_used_bytes": 7 * 2**30}

    def counters() -> tuple[int, int, int]:
        with session_scope(url) as s:
            row = s.execute(
                text(
                    "SELECT gpu_util_samples, gpu_peak_memory_bytes, "
                    "(SELECT count(*) FROM job_logs WHERE job_id = :j) AS logs "
                    "FROM jobs WHERE id = :j"
                ),
                {"j": job_id},
            ).one()
        return row.gpu_util_samples, row.gpu_peak_memory_bytes or 0, row.logs

    # When the zombie wakes up and writes its output and its GPU sample
    with session_scope(url) as s:
        assert not append_log(session=s, job_id=job_id, epoch=old.epoch, chunk="zombie")
        device_rows.record_sample(session=s, uuid="GPU-a", worker="w1", sample=sample)
    # Then neither lands on the job
    assert counters() == (0, 0, 0)
    # while the new holder's do
    with session_scope(url) as s:
        assert append_log(session=s, job_id=job_id, epoch=new.epoch, chunk="alive")
        device_rows.record_sample(session=s, uuid="GPU-b", worker="w2", sample=sample)
    assert counters() == (1, 7 * 2**30, 1)
