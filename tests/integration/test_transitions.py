"""Each conditional statement moves a job only along the transition table of app.domain.states."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import leases
from app.db.jobs import JobAlreadyFinished, cancel_job, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import ErrorKind, JobStatus, LeaseOutcome, can_transition
from app.settings import Settings

EPOCH = 7


def _job_in(settings: Settings, status: JobStatus) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        job_id = submit_job(
            session=s, tenant="t", spec=JobSpec.model_validate({"framework": "torch"})
        ).job_id
        s.execute(
            text("UPDATE jobs SET status = CAST(:st AS job_status), epoch = :e WHERE id = :j"),
            {"st": status.value, "e": EPOCH, "j": job_id},
        )
        if status == JobStatus.RUNNING:
            s.execute(
                text(
                    "INSERT INTO leases (job_id, epoch, worker, expires_at) "
                    "VALUES (:j, :e, 'w', now() + interval '1 minute')"
                ),
                {"j": job_id, "e": EPOCH},
            )
    return job_id


def _acquire(s: Session, j: uuid.UUID) -> bool:
    return (
        leases.acquire_lease(session=s, job_id=j, worker="w2", device_uuid=None, ttl=5) is not None
    )


def _finisher(outcome: LeaseOutcome) -> Callable[[Session, uuid.UUID], bool]:
    def finish(s: Session, j: uuid.UUID) -> bool:
        return leases.finish(session=s, job_id=j, epoch=EPOCH, outcome=outcome, result={})

    return finish


def _requeue(s: Session, j: uuid.UUID) -> bool:
    status = leases.requeue_for_retry(
        session=s, job_id=j, epoch=EPOCH, kind=ErrorKind.INFRA, message="x", backoff_s=1
    )
    return status is not None


def _cancel_queued(s: Session, j: uuid.UUID) -> bool:
    try:
        return cancel_job(session=s, tenant="t", job_id=j) == JobStatus.CANCELLED
    except JobAlreadyFinished:
        return False


Q, R = JobStatus.QUEUED, JobStatus.RUNNING
#: operation -> (statement, the state it moves to, the state it moves from)
OPERATIONS: dict[str, tuple[Callable[[Session, uuid.UUID], bool], JobStatus, JobStatus]] = {
    "acquire": (_acquire, JobStatus.RUNNING, Q),
    "succeed": (_finisher(LeaseOutcome.SUCCEEDED), JobStatus.SUCCEEDED, R),
    "fail": (_finisher(LeaseOutcome.FAILED), JobStatus.FAILED, R),
    "cancel running": (_finisher(LeaseOutcome.CANCELLED), JobStatus.CANCELLED, R),
    "requeue": (_requeue, JobStatus.QUEUED, R),
    "cancel queued": (_cancel_queued, JobStatus.CANCELLED, Q),
}


@pytest.mark.parametrize("start", list(JobStatus))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_statements_follow_the_transition_table(
    settings: Settings, start: JobStatus, operation: str
) -> None:
    job_id = _job_in(settings, start)
    run, target, source = OPERATIONS[operation]
    with session_scope(settings.database_url) as s:
        moved = run(s, job_id)
    with session_scope(settings.database_url) as s:
        now = JobStatus(s.scalar(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id}))
    # Then it moves exactly from its own source state, along an allowed transition
    assert moved == (start == source), f"{operation} from {start}: moved={moved}"
    if moved:
        assert can_transition(start, target), f"{operation} moved {start} to {target}"
        assert now == target
    else:
        assert now == start
