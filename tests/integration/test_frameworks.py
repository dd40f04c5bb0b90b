"""Frameworks on a real Postgres: recorded at the claim, judged by waiting_reason and validate,
refused by the lease condition, and moved to their queues by migration 0002."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.api.app import create_app
from app.db import devices as device_rows
from app.db.jobs import job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.conftest import PG_ADMIN_DSN, ROOT, device_record, sqlalchemy_url

TORCH_ONLY = {"torch": "2.13.0"}
BOTH = {"torch": "2.13.0", "tensorflow": "2.21.0"}


def _spec(framework: str) -> JobSpec:
    return JobSpec.model_validate({"framework": framework, "resources": {"memory_gb": 8}})


def _claim(settings: Settings, uuid_: str, worker: str, offered: dict[str, str] | None) -> None:
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=[device_record(uuid_)])
        claimed = device_rows.claim_device(
            session=s, uuids=[uuid_], worker=worker, ttl=60, frameworks=offered
        )
        assert claimed == uuid_


def _submit(settings: Settings, framework: str) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=_spec(framework)).job_id


def _reason(settings: Settings, job_id: uuid.UUID) -> str | None:
    with session_scope(settings.database_url) as s:
        reason: str | None = job_view(session=s, tenant="t", job_id=job_id)["waiting_reason"]
        return reason


def test_the_claim_records_what_the_worker_offers(settings: Settings) -> None:
    _claim(settings, "GPU-a", "w1", TORCH_ONLY)
    with session_scope(settings.database_url) as s:
        (shown,) = device_rows.list_devices(session=s)
    assert shown["frameworks"] == TORCH_ONLY and not shown["suspect"]


def test_a_tensorflow_job_on_a_torch_only_fleet_says_why_it_waits(settings: Settings) -> None:
    # Given a live worker that offers torch only
    _claim(settings, "GPU-a", "w1", TORCH_ONLY)
    tf_job, torch_job = _submit(settings, "tensorflow"), _submit(settings, "torch")
    # Then the TensorFlow job says why it waits, and the torch job has no reason to
    reason = _reason(settings, tf_job)
    assert reason is not None
    assert "no live worker of a device that fits has framework 'tensorflow'" in reason
    assert "they offer: torch" in reason
    assert _reason(settings, torch_job) is None
    # And the lease condition refuses it on that device
    with session_scope(settings.database_url) as s:
        assert not device_rows.device_may_start(session=s, uuid="GPU-a", job_id=tf_job)
        assert device_rows.device_may_start(session=s, uuid="GPU-a", job_id=torch_job)
    # When a worker that has TensorFlow claims another device
    _claim(settings, "GPU-b", "w2", BOTH)
    # Then the reason is gone, and that device may start it
    assert _reason(settings, tf_job) is None
    with session_scope(settings.database_url) as s:
        assert device_rows.device_may_start(session=s, uuid="GPU-b", job_id=tf_job)


def test_with_no_live_worker_the_last_reported_frameworks_are_judged(settings: Settings) -> None:
    _claim(settings, "GPU-a", "w1", TORCH_ONLY)
    with session_scope(settings.database_url) as s:
        device_rows.release_device(session=s, uuid="GPU-a", worker="w1")
    reason = _reason(settings, _submit(settings, "tensorflow"))
    assert reason is not None and reason.startswith("no worker of a device that fits")


def test_live_workers_are_judged_before_stopped_ones(settings: Settings) -> None:
    # Given a stopped worker that had TensorFlow, and a live one that has torch only
    _claim(settings, "GPU-b", "w2", BOTH)
    with session_scope(settings.database_url) as s:
        device_rows.release_device(session=s, uuid="GPU-b", worker="w2")
    _claim(settings, "GPU-a", "w1", TORCH_ONLY)
    # Then a TensorFlow job waits for a live worker that has it
    reason = _reason(settings, _submit(settings, "tensorflow"))
    assert reason is not None and reason.startswith("no live worker")


def test_a_worker_that_did_not_report_is_not_held_against_the_job(settings: Settings) -> None:
    _claim(settings, "GPU-a", "w1", None)
    job_id = _submit(settings, "tensorflow")
    assert _reason(settings, job_id) is None
    with session_scope(settings.database_url) as s:
        assert device_rows.device_may_start(session=s, uuid="GPU-a", job_id=job_id)


def test_validate_says_it_too(settings: Settings) -> None:
    _claim(settings, "GPU-a", "w1", TORCH_ONLY)
    client = TestClient(create_app(settings))
    body: dict[str, Any] = {"framework": "tensorflow", "resources": {"memory_gb": 8}}
    verdict = client.post("/v1/jobs/validate", json=body).json()
    assert verdict["queue"] == "gpu.any.8.tensorflow"
    assert [(d["uuid"], d["frameworks"]) for d in verdict["fits"]] == [("GPU-a", ["torch"])]
    assert "has framework 'tensorflow'" in verdict["waiting_reason"]
    body["framework"] = "torch"
    assert client.post("/v1/jobs/validate", json=body).json()["waiting_reason"] is None


@pytest.fixture
def db_at_0001() -> Any:
    name = f"gpufleet_m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = sqlalchemy_url(name)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "0001")
    yield cfg
    from app.db.session import _factories

    factory = _factories.pop(sqlalchemy_url(name), None)
    if factory is not None:
        factory.kw["bind"].dispose()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def test_migration_0002_moves_tensorflow_jobs_to_their_queues_and_back(db_at_0001: Any) -> None:
    # Given jobs submitted before 0002, in the plain queues
    url = db_at_0001.attributes["url"]
    insert = text(
        "INSERT INTO jobs (id, tenant, name, status, spec, queue, priority, spec_hash, "
        "max_attempts) VALUES (gen_random_uuid(), 't', :n, 'queued', "
        "CAST(:spec AS jsonb), 'gpu.any.8', 5, 'h', 3)"
    )
    with session_scope(url) as s:
        s.execute(insert, {"n": "tf", "spec": '{"framework": "tensorflow"}'})
        s.execute(insert, {"n": "torch", "spec": '{"framework": "torch"}'})

    def queues() -> dict[str, str]:
        with session_scope(url) as s:
            return {r.name: r.queue for r in s.execute(text("SELECT name, queue FROM jobs"))}

    # When the schema is upgraded, then downgraded
    command.upgrade(db_at_0001, "0002")
    upgraded = queues()
    command.downgrade(db_at_0001, "0001")
    # Then the TensorFlow job moved to its queue and back; the torch job stayed
    assert upgraded == {"tf": "gpu.any.8.tensorflow", "torch": "gpu.any.8"}
    assert queues() == {"tf": "gpu.any.8", "torch": "gpu.any.8"}
