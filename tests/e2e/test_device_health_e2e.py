"""A suspect GPU takes no job until its keeper's health check passes; its worker stops
consuming meanwhile, so the wake-up waits in the broker for a healthy worker."""

from __future__ import annotations

import time

import pytest

from app.db import devices as device_rows
from app.db.session import session_scope
from tests.e2e.fleet import Fleet, small_job, wait_for

pytestmark = pytest.mark.e2e


def _mark(fleet: Fleet, uuid: str) -> None:
    """What the supervisor does after a trainer failure with ``device_suspect``."""
    with session_scope(fleet.env["GPUFLEET_DATABASE_URL"]) as s:
        assert device_rows.mark_suspect(
            session=s, uuid=uuid, worker="test", reason="CUDA error: uncorrectable ECC error"
        )


def _device(fleet: Fleet, host: str) -> dict[str, object]:
    devices = fleet.get("/v1/devices")["devices"]
    found: dict[str, object] = next(d for d in devices if d["host"] == host)
    return found


def test_an_unhealthy_suspect_device_takes_no_job(fleet: Fleet) -> None:
    # Given a worker whose simulated GPU fails its health check, marked suspect
    fleet.start_api()
    fleet.start_reaper()
    sick = fleet.start_worker(
        "worker-sick", fake_gpus="A100:80", host="host-a", env={"GPUFLEET_FAKE_UNHEALTHY_GPUS": "0"}
    )
    fleet.wait_workers_ready(1)
    _mark(fleet, str(_device(fleet, "host-a")["uuid"]))
    wait_for(lambda: "stopped consuming" in sick.log(), timeout=30, what="the worker to pause")
    # When a job is submitted
    job_id = fleet.submit(small_job())
    time.sleep(4)  # past the reaper's redispatch
    # Then it waits, saying why, and the device shows why it is suspect
    job = fleet.job(job_id)
    assert job["status"] == "queued" and job["leases"] == []
    assert "suspect" in job["waiting_reason"]
    device = _device(fleet, "host-a")
    assert device["suspect"] and "uncorrectable ECC" in str(device["suspect_reason"])
    assert "still unhealthy" in sick.log()
    # When a healthy worker joins, it runs the job
    fleet.start_worker("worker-ok", fake_gpus="A100:80", host="host-b")
    final = fleet.wait_final([job_id], timeout=120)[job_id]
    assert final["status"] == "succeeded"
    assert [lease["worker"].rsplit("@", 1)[1] for lease in final["leases"]] == ["host-b"]


def test_a_healthy_suspect_device_is_cleared_and_runs_jobs_again(fleet: Fleet) -> None:
    # Given a worker on a healthy GPU that a fault report marked suspect
    fleet.start_api()
    fleet.start_reaper()
    worker = fleet.start_worker("worker-a", fake_gpus="A100:80", host="host-a")
    fleet.wait_workers_ready(1)
    _mark(fleet, str(_device(fleet, "host-a")["uuid"]))
    # Then its keeper checks it, clears it, and the worker consumes again
    wait_for(lambda: "passed its health check" in worker.log(), timeout=30, what="the check")
    wait_for(lambda: "resumed consuming" in worker.log(), timeout=30, what="the worker to resume")
    assert not _device(fleet, "host-a")["suspect"]
    job_id = fleet.submit(small_job())
    assert fleet.wait_final([job_id], timeout=120)[job_id]["status"] == "succeeded"
