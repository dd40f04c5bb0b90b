"""Suspect devices on a real Postgres: marking, the lease condition, the keeper's health check."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text

from app.db import devices as device_rows
from app.db import leases
from app.db.jobs import job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.conftest import device_record
from workers.claim import DeviceKeeper
from workers.devices import GpuDevice, Health

GPU = "GPU-sim-h-0-A100"
SPEC = JobSpec.model_validate({"framework": "torch"})


def _device(index: int = 0) -> GpuDevice:
    return GpuDevice(
        index=index,
        uuid=GPU,
        name="Simulated A100",
        gpu_type="A100",
        memory_bytes=80 * 2**30,
        pci_bus_id=f"sim:{index}",
        simulated=True,
    )


@pytest.fixture
def claimed(settings: Settings) -> str:
    """GPU registered and claimed by worker ``w1``."""
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=[device_record(GPU)])
        assert device_rows.claim_device(session=s, uuids=[GPU], worker="w1", ttl=60)
    return GPU


def _mark(settings: Settings, reason: str = "CUDA error: uncorrectable ECC error") -> bool:
    with session_scope(settings.database_url) as s:
        return device_rows.mark_suspect(session=s, uuid=GPU, worker="w1", reason=reason)


def _suspicion(settings: Settings) -> device_rows.Suspicion | None:
    with session_scope(settings.database_url) as s:
        return device_rows.suspicion(session=s, uuid=GPU)


def _submit(settings: Settings) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=SPEC).job_id


def test_mark_keeps_the_first_reason_and_clear_needs_the_holder_and_the_same_suspicion(
    settings: Settings, claimed: str
) -> None:
    # Given a claimed, healthy device
    assert _suspicion(settings) is None
    # When a job on it fails with a GPU fault, and then another one does
    assert _mark(settings, "job a: CUDA error: unspecified launch failure")
    assert not _mark(settings, "job b: GPU is lost")
    # Then it is suspect since the first report, with its reason and reporter
    found = _suspicion(settings)
    assert found is not None
    assert found.reason == "job a: CUDA error: unspecified launch failure (reported by w1)"
    with session_scope(settings.database_url) as s:
        # Not cleared by a worker that does not hold it, nor for a suspicion it did not check
        assert not device_rows.clear_suspect(session=s, uuid=GPU, worker="w2", since=found.since)
        earlier = found.since - timedelta(seconds=1)
        assert not device_rows.clear_suspect(session=s, uuid=GPU, worker="w1", since=earlier)
        # Cleared by its holder for the suspicion it checked
        assert device_rows.clear_suspect(session=s, uuid=GPU, worker="w1", since=found.since)
    assert _suspicion(settings) is None
    # An unknown device is not marked
    with session_scope(settings.database_url) as s:
        assert not device_rows.mark_suspect(session=s, uuid="GPU-x", worker="w1", reason="r")


def test_no_job_may_start_on_a_suspect_device(settings: Settings, claimed: str) -> None:
    job_id = _submit(settings)
    with session_scope(settings.database_url) as s:
        assert device_rows.device_may_start(session=s, uuid=GPU, job_id=job_id)
        assert device_rows.device_may_start(session=s, uuid=None, job_id=job_id)
    _mark(settings)
    with session_scope(settings.database_url) as s:
        assert not device_rows.device_may_start(session=s, uuid=GPU, job_id=job_id)
        # A worker without a device, or on another device, is not concerned
        assert device_rows.device_may_start(session=s, uuid=None, job_id=job_id)
        assert device_rows.device_may_start(session=s, uuid="GPU-other", job_id=job_id)


def test_acquire_lease_refuses_a_suspect_device(settings: Settings, claimed: str) -> None:
    job_id = _submit(settings)
    _mark(settings)
    with session_scope(settings.database_url) as s:
        grant = leases.acquire_lease(
            session=s, job_id=job_id, worker="w1", device_uuid=GPU, ttl=settings.lease_ttl
        )
    assert grant is None


def test_devices_and_waiting_reason_show_the_suspicion(settings: Settings, claimed: str) -> None:
    job_id = _submit(settings)
    _mark(settings, "CUDA error: an illegal memory access was encountered")
    with session_scope(settings.database_url) as s:
        (shown,) = device_rows.list_devices(session=s)
        view = job_view(session=s, tenant="t", job_id=job_id)
    assert shown["suspect"] and shown["suspect_since"]
    assert shown["suspect_reason"].startswith("CUDA error: an illegal memory access")
    assert "is suspect after a GPU fault" in view["waiting_reason"]


class Recorder:
    """``on_suspect`` that records its calls; refuses while ``up`` is False (no consumer yet)."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.up = True

    def __call__(self, suspect: bool) -> bool:
        self.calls.append(suspect)
        return self.up


def test_the_keeper_clears_a_suspect_device_once_its_check_passes(
    settings: Settings, claimed: str
) -> None:
    # Given a suspect device whose health check fails, then passes
    answers = [Health(False, "retired pages are pending"), Health(True, "answers")]
    gate = Recorder()
    keeper = DeviceKeeper(
        settings, _device(), "w1", on_suspect=gate, health_check=lambda d: answers.pop(0)
    )
    keeper.look_after_health()
    assert gate.calls == [] and not keeper.suspect  # healthy: nothing to do
    _mark(settings)
    # When the keeper looks while the check fails
    keeper.look_after_health()
    # Then the device stays suspect and the worker stops taking jobs
    assert _suspicion(settings) is not None and keeper.suspect and gate.calls == [True]
    # When the check passes
    keeper.look_after_health()
    # Then the suspicion is cleared and the worker takes jobs again
    assert _suspicion(settings) is None and not keeper.suspect and gate.calls == [True, False]


def test_the_keeper_asks_again_until_the_worker_could_stop_consuming(
    settings: Settings, claimed: str
) -> None:
    gate = Recorder()
    gate.up = False
    keeper = DeviceKeeper(
        settings, _device(), "w1", on_suspect=gate, health_check=lambda d: Health(False, "no")
    )
    _mark(settings)
    keeper.look_after_health()
    keeper.look_after_health()
    gate.up = True
    keeper.look_after_health()
    keeper.look_after_health()
    assert gate.calls == [True, True, True]


def test_a_simulated_device_set_unhealthy_stays_suspect(settings: Settings, claimed: str) -> None:
    # Given the fault-injection setting that fails simulated GPU 0's health check
    sick = settings.model_copy(update={"fake_unhealthy_gpus": "0"})
    _mark(settings)
    # When its keeper looks, with the real (simulated) check
    DeviceKeeper(sick, _device(0), "w1").look_after_health()
    # Then it stays suspect; a keeper without the setting clears it
    assert _suspicion(settings) is not None
    DeviceKeeper(settings, _device(0), "w1").look_after_health()
    assert _suspicion(settings) is None


def test_a_suspicion_reported_during_the_check_survives_it(
    settings: Settings, claimed: str
) -> None:
    # Given a suspect device whose check passes, but a new fault is reported while it runs
    _mark(settings, "first")

    def check(_: GpuDevice) -> Health:
        with session_scope(settings.database_url) as s:
            found = device_rows.suspicion(session=s, uuid=GPU)
            assert found is not None
            s.execute(
                text(
                    "UPDATE devices SET suspect_since = now() + interval '1 second', "
                    "suspect_reason = 'second' WHERE uuid = :u"
                ),
                {"u": GPU},
            )
        return Health(True, "answers")

    DeviceKeeper(settings, _device(), "w1", health_check=check).look_after_health()
    # Then the newer suspicion stays for the next check
    found = _suspicion(settings)
    assert found is not None and found.reason == "second"


def test_the_fleet_summary_and_metrics_count_suspect_devices(
    settings: Settings, claimed: str
) -> None:
    from prometheus_client import generate_latest

    from app.api.metrics import make_registry
    from app.db.fleet import fleet_summary

    def counted() -> tuple[int, str]:
        with session_scope(settings.database_url) as s:
            summary = fleet_summary(session=s)
        text_ = generate_latest(make_registry(settings)).decode()
        line = next(x for x in text_.splitlines() if x.startswith("gpufleet_device_suspect{"))
        return summary["devices"]["suspect"], line.rsplit(" ", 1)[1]

    assert counted() == (0, "0.0")
    assert _mark(settings)
    assert counted() == (1, "1.0")
