"""``max_wait``: the reaper fails queued jobs that waited too long or that no registered
device could ever run, as ``unschedulable``, with the reason."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from app.db.devices import register_devices
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.conftest import device_record
from workers.reaper import Reaper


def _submit(settings: Settings, **spec: Any) -> uuid.UUID:
    body = JobSpec.model_validate({"framework": "torch", **spec})
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=body).job_id


def _state(settings: Settings, job_id: uuid.UUID) -> tuple[str, Any]:
    with session_scope(settings.database_url) as s:
        row = s.execute(text("SELECT status, error FROM jobs WHERE id = :j"), {"j": job_id}).one()
    return row.status, row.error


def test_max_wait_fails_jobs_that_waited_too_long_or_can_never_fit(settings: Settings) -> None:
    waited = _submit(settings, max_wait=60)
    patient = _submit(settings)  # no max_wait: waits for ever
    fresh = _submit(settings, max_wait=3600)
    too_big = _submit(settings, max_wait=3600, resources={"memory_gb": 40})
    with session_scope(settings.database_url) as s:
        s.execute(
            text("UPDATE jobs SET created_at = now() - interval '2 minutes' WHERE id = ANY(:j)"),
            {"j": [waited, patient]},
        )
    reaper = Reaper(settings)
    reaper.pass_once()  # no device registered yet: only the wait counts
    assert _state(settings, too_big)[0] == "queued"
    with session_scope(settings.database_url) as s:
        register_devices(session=s, devices=[device_record("GPU-t4", gpu_type="T4", gib=15)])
    reaper.pass_once()
    status, error = _state(settings, waited)
    assert status == "failed" and error["kind"] == "unschedulable"
    assert "max_wait (60 s)" in error["message"]
    status, error = _state(settings, too_big)
    assert status == "failed" and error["kind"] == "unschedulable"
    assert "no registered device fits gpu_type=any memory_gb=40" in error["message"]
    assert _state(settings, patient)[0] == "queued"
    assert _state(settings, fresh)[0] == "queued"
    with session_scope(settings.database_url) as s:
        kinds = s.scalars(
            text("SELECT kind FROM job_events WHERE job_id = :j ORDER BY seq"), {"j": too_big}
        ).all()
    assert kinds == ["submitted", "failed"]
