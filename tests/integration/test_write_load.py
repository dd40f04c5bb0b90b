"""A running job costs one write per heartbeat interval: its progress, the device claim's
renewal and the GPU sample go with the lease heartbeat, fenced by the epoch like every write,
and the API shows them within one heartbeat. An idle device costs one write per interval too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from app.db import devices as device_rows
from app.db import leases
from app.db.jobs import get_job, submit_job
from app.db.session import engine_for, session_scope
from app.domain.spec import JobSpec
from app.domain.states import LeaseOutcome
from app.settings import Settings
from tests.conftest import device_record
from workers.claim import DeviceKeeper
from workers.devices import GpuDevice, SimulatedSampler
from workers.handoff import Handoff
from workers.lease_writer import LeaseLost, LeaseWriter
from workers.telemetry import TelemetryLoop

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


# -- one write per heartbeat interval for a busy device ------------------------------------

GPU = "GPU-sim-writes-0"


def _gpu() -> GpuDevice:
    return GpuDevice(
        index=0,
        uuid=GPU,
        name="Simulated A100",
        gpu_type="A100",
        memory_bytes=80 * 2**30,
        pci_bus_id="sim:0",
        simulated=True,
    )


def _device_row(settings: Settings) -> Any:
    with session_scope(settings.database_url) as s:
        return s.execute(
            text("SELECT last_sample, sampled_at, expires_at FROM devices WHERE uuid = :u"),
            {"u": GPU},
        ).one()


def test_a_busy_device_costs_one_write_per_heartbeat_and_an_idle_one_too(
    settings: Settings, tmp_path: Path
) -> None:
    """The worker's three writers — the device keeper and the telemetry thread (main process)
    and the lease writer (the job's process) — run for real, sharing a hand-off directory:
    while the job runs, every statement the process issues is the lease heartbeat, which also
    renews the device claim and stores the latest GPU sample (undo the fold and the keeper's
    claim renewal and the sample appear as statements of their own)."""
    fast = settings.model_copy(
        update={"heartbeat_interval": 1.0, "telemetry_interval": 0.2, "lease_ttl": 10.0}
    )
    url = fast.database_url
    with session_scope(url) as s:
        device_rows.register_devices(session=s, devices=[device_record(GPU)])
        assert device_rows.claim_device(session=s, uuids=[GPU], worker="w1", ttl=10)
        job_id = submit_job(session=s, tenant="t", spec=SPEC).job_id
        grant = leases.acquire_lease(session=s, job_id=job_id, worker="w1", device_uuid=GPU, ttl=10)
    assert grant is not None
    claimed_until = _device_row(fast).expires_at
    keeper = DeviceKeeper(fast, _gpu(), "w1", handoff=Handoff(tmp_path))
    telemetry = TelemetryLoop(fast, _gpu(), "w1", SimulatedSampler(), Handoff(tmp_path))
    writer = LeaseWriter(url, job_id, grant.epoch, ttl=10, handoff=Handoff(tmp_path))
    seen = _statements(fast)
    telemetry.start()
    keeper.start()
    try:
        # When the job runs for four heartbeat intervals (its heartbeat twice an interval, so
        # that a loaded machine's scheduling never lets the keeper's hand-off go stale)
        beats = 0
        for step in range(8):
            time.sleep(0.5)
            writer.progress({"step": step})
            assert writer.heartbeat().device_held
            beats += 1
        busy = list(seen)
        # Then the heartbeats are the only statements: no keeper, no telemetry
        assert len(busy) == beats, busy
        assert all("UPDATE leases" in statement for statement in busy)
        # And they renewed the claim and stored busy samples, folded into the job
        row = _device_row(fast)
        assert row.expires_at > claimed_until
        assert row.last_sample["utilization"] > 0.5
        with session_scope(url) as s:
            job = s.execute(
                text("SELECT gpu_util_samples, gpu_util_sum FROM jobs WHERE id = :j"), {"j": job_id}
            ).one()
        assert 1 <= job.gpu_util_samples <= beats
        assert job.gpu_util_sum / job.gpu_util_samples > 0.5
        # When the job ends and the device idles
        assert writer.finish(LeaseOutcome.SUCCEEDED, result={}, budget=5)
        time.sleep(3 * fast.heartbeat_interval)
        seen.clear()
        time.sleep(3 * fast.heartbeat_interval)
        idle = list(seen)
    finally:
        keeper.stop()
        telemetry.stopping.set()
        keeper.join(timeout=10)
        telemetry.join(timeout=10)
    # Then the keeper renews the claim itself, one statement an interval carrying the sample
    assert 2 <= len(idle) <= 4, idle
    assert all("UPDATE devices" in statement for statement in idle), idle
    row = _device_row(fast)
    assert row.last_sample["utilization"] < 0.1  # an idle sample
    assert time.time() - row.last_sample["taken_at"] < 2 * fast.heartbeat_interval
