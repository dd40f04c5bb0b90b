"""A running job's progress costs no write of its own: it goes with the heartbeat, onto the
lease row, fenced by the epoch like every write, and the API shows it within one heartbeat."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from app.db import leases
from app.db.jobs import get_job, submit_job
from app.db.session import engine_for, session_scope
from app.domain.spec import JobSpec
from app.domain.states import LeaseOutcome
from app.settings import Settings
from workers.lease_writer import LeaseLost, LeaseWriter

SPEC = JobSpec.model_validate({"framework": "torch"})


def _statements(settings: Settings) -> list[str]:
    seen: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine_for(settings.database_url), "before_cursor_execute", capture)
    return seen


def _progress(settings: Settings, job_id: Any) -> Any:
    with session_scope(settings.database_url) as s:
        return get_job(session=s, tenant=None, job_id=job_id).progress


def test_progress_rides_on_the_heartbeat_and_is_fenced(settings: Settings) -> None:
    url = settings.database_url
    with session_scope(url) as s:
        job_id = submit_job(session=s, tenant="t", spec=SPEC).job_id
        grant = leases.acquire_lease(session=s, job_id=job_id, worker="w", device_uuid=None, ttl=60)
    assert grant is not None
    writer = LeaseWriter(url, job_id, grant.epoch, ttl=60)
    seen = _statements(settings)
    # When the trainer reports progress many times between two heartbeats
    for step in range(1, 21):
        writer.progress({"step": step, "total_steps": 100})
    # Then nothing is written, and the API shows none yet
    assert seen == []
    assert _progress(settings, job_id) is None
    seen.clear()
    # When the heartbeat comes: one statement renews the lease and stores the latest progress
    writer.heartbeat()
    assert len(seen) == 1 and "UPDATE leases" in seen[0]
    assert _progress(settings, job_id) == {"step": 20, "total_steps": 100}
    # And a heartbeat with nothing new keeps it
    writer.heartbeat()
    assert _progress(settings, job_id) == {"step": 20, "total_steps": 100}
    # And the last progress before the run's end is stored with the end
    writer.progress({"step": 100, "total_steps": 100})
    assert writer.finish(LeaseOutcome.SUCCEEDED, result={}, budget=5)
    assert _progress(settings, job_id) == {"step": 100, "total_steps": 100}


def test_a_stale_holders_progress_never_reaches_the_job(settings: Settings) -> None:
    url = settings.database_url
    with session_scope(url) as s:
        job_id = submit_job(session=s, tenant="t", spec=SPEC).job_id
        grant = leases.acquire_lease(session=s, job_id=job_id, worker="w", device_uuid=None, ttl=60)
    assert grant is not None
    stale = LeaseWriter(url, job_id, grant.epoch - 1, ttl=60)
    stale.progress({"step": 99})
    with pytest.raises(LeaseLost):
        stale.heartbeat()
    with session_scope(url) as s:
        assert not leases.record_progress(
            session=s, job_id=job_id, epoch=grant.epoch - 1, progress={"step": 98}
        )
    assert _progress(settings, job_id) is None
