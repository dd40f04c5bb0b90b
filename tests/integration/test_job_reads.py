"""The API's submit and get send their statements through psycopg's cursor (app.db.driver):
the same records as the ORM path, the same tenant scoping, the same idempotency."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event

from app.db import jobs, leases
from app.db.devices import claim_device, register_devices
from app.db.session import autocommit_connection, engine_for, session_scope
from app.domain.spec import JobSpec
from app.domain.states import JobStatus
from app.settings import Settings
from tests.conftest import device_record

SPEC = JobSpec.model_validate({"framework": "torch", "training": {"batch_size": 8}})


def _orm(settings: Settings, job_id: uuid.UUID, tenant: str | None = "t") -> jobs.JobRecord:
    with session_scope(settings.database_url) as s:
        return jobs.get_job(session=s, tenant=tenant, job_id=job_id)


def _driver(settings: Settings, job_id: uuid.UUID, tenant: str | None = "t") -> jobs.JobRecord:
    with autocommit_connection(settings.database_url) as c:
        return jobs.read_job(connection=c, tenant=tenant, job_id=job_id)


def test_a_job_reads_the_same_through_the_driver_as_through_the_orm(settings: Settings) -> None:
    with autocommit_connection(settings.database_url) as c:
        submitted = jobs.insert_job(connection=c, tenant="t", spec=SPEC)
    assert submitted.created and submitted.record is not None
    # Committed by itself (autocommit): another session sees it, as the submit returned it.
    assert _orm(settings, submitted.job_id) == submitted.record
    assert submitted.record.leases == [] and submitted.record.batch.size == 8

    with session_scope(settings.database_url) as s:  # a try on a registered GPU, reporting
        register_devices(session=s, devices=[device_record("GPU-a", index=2)])
        assert claim_device(session=s, uuids=["GPU-a"], worker="w1", ttl=60) == "GPU-a"
        grant = leases.acquire_lease(
            session=s, job_id=submitted.job_id, worker="w1", device_uuid="GPU-a", ttl=60
        )
        assert grant is not None
        assert leases.record_progress(
            session=s, job_id=submitted.job_id, epoch=grant.epoch, progress={"step": 7}
        )
        assert (
            leases.record_checkpoint(
                session=s, job_id=submitted.job_id, epoch=grant.epoch, step=7, path="p", keep=3
            )
            is not None
        )
    running = _driver(settings, submitted.job_id)
    assert running == _orm(settings, submitted.job_id)
    assert running.lease is not None and running.lease.host == "h" and running.lease.gpu_index == 2
    assert running.progress == {"step": 7}
    assert running.checkpoint is not None and running.checkpoint.step == 7
    # Scoped like get_job: another tenant's job is not found, an admin (None) sees it.
    with pytest.raises(jobs.JobNotFound):
        _driver(settings, submitted.job_id, tenant="other")
    assert _driver(settings, submitted.job_id, tenant=None) == running
    with pytest.raises(jobs.JobNotFound):
        _driver(settings, uuid.uuid4())


def test_an_idempotency_key_returns_the_first_job_or_a_conflict(settings: Settings) -> None:
    with autocommit_connection(settings.database_url) as c:
        first = jobs.insert_job(connection=c, tenant="t", spec=SPEC, idempotency_key="k")
        again = jobs.insert_job(connection=c, tenant="t", spec=SPEC, idempotency_key="k")
        assert (again.job_id, again.created, again.record) == (first.job_id, False, None)
        other = JobSpec.model_validate({"framework": "tensorflow"})
        with pytest.raises(jobs.IdempotencyConflict):
            jobs.insert_job(connection=c, tenant="t", spec=other, idempotency_key="k")
        # The key is the tenant's own: another tenant's same key makes another job.
        theirs = jobs.insert_job(connection=c, tenant="u", spec=SPEC, idempotency_key="k")
        assert theirs.created and theirs.job_id != first.job_id


def test_a_page_of_jobs_reads_the_same_through_the_driver_as_through_the_orm(
    settings: Settings,
) -> None:
    with autocommit_connection(settings.database_url) as c:
        ids = [jobs.insert_job(connection=c, tenant="t", spec=SPEC).job_id for _ in range(3)]
        jobs.insert_job(connection=c, tenant="u", spec=SPEC)
    pages: list[tuple[str | None, JobStatus | None]] = [
        ("t", None),
        ("t", JobStatus.QUEUED),
        (None, None),  # an admin: every tenant's
        ("t", JobStatus.RUNNING),
    ]
    for tenant, status in pages:
        cursor = None
        seen: list[uuid.UUID] = []
        while True:
            with session_scope(settings.database_url) as s:
                orm = jobs.list_jobs(
                    session=s, tenant=tenant, status=status, limit=2, cursor=cursor
                )
            with autocommit_connection(settings.database_url) as c:
                driver = jobs.read_jobs(
                    connection=c, tenant=tenant, status=status, limit=2, cursor=cursor
                )
            assert driver == orm
            seen += [r.id for r in driver[0]]
            cursor = driver[1]
            if cursor is None:
                break
        expected = 0 if status == JobStatus.RUNNING else 4 if tenant is None else 3
        assert len(seen) == len(set(seen)) == expected
        if tenant == "t" and status != JobStatus.RUNNING:
            assert seen == ids[::-1]  # newest first


def test_statement_listeners_still_see_the_driver_s_statements(settings: Settings) -> None:
    """Counting tests and tracing listen to the engine's cursor events."""
    seen: list[tuple[str, str]] = []

    def before(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(("before", statement))

    def after(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(("after", statement))

    engine = engine_for(settings.database_url)
    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        with autocommit_connection(settings.database_url) as c:
            job_id = jobs.insert_job(connection=c, tenant="t", spec=SPEC).job_id
            jobs.read_job(connection=c, tenant="t", job_id=job_id)
            jobs.read_jobs(connection=c, tenant="t", status=None, limit=5, cursor=None)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    for phase in ("before", "after"):
        sent = [s for p, s in seen if p == phase]
        assert len([s for s in sent if "INSERT INTO jobs" in s]) == 1
        assert len([s for s in sent if "FROM jobs j" in s]) == 2  # the job, the page
