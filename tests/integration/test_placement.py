"""Placement that fights fragmentation on a real Postgres and Redis (``app.domain.fragmentation``,
``workers.placement``): a single-GPU job leaves gang-sized holes whole, a gang goes to the host
that fits it most tightly, each deferral ends within its bound, and the lease still decides.

The fleet: host-4 with 4 A100s, host-2 with 2 and host-1 with 1, each device held by its own
live worker."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from app.db import devices as device_rows
from app.db import leases
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.fragmentation import gang_defers_to, single_defers_to
from app.domain.spec import JobSpec
from app.queue import Dispatcher
from app.settings import Settings
from tests.conftest import device_record
from workers.gang_lease import win
from workers.identity import WorkerIdentity
from workers.placement import defer_single

HOSTS = {
    "host-4": ["GPU-a0", "GPU-a1", "GPU-a2", "GPU-a3"],
    "host-2": ["GPU-b0", "GPU-b1"],
    "host-1": ["GPU-c0"],
}
HOST_OF = {u: host for host, uuids in HOSTS.items() for u in uuids}
QUEUE = "gpu.A100.8"


@pytest.fixture
def fleet(settings: Settings) -> Settings:
    records = [
        dataclasses.replace(device_record(u, index=i), host=host)
        for host, uuids in HOSTS.items()
        for i, u in enumerate(uuids)
    ]
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=records)
        for r in records:
            assert device_rows.claim_device(session=s, uuids=[r.uuid], worker=r.uuid, ttl=60)
    return settings


def _on(settings: Settings, host: str, defer_s: float) -> Settings:
    return settings.model_copy(update={"hostname": host, "placement_defer_s": defer_s})


def _submit(settings: Settings, gpu_count: int = 1) -> uuid.UUID:
    spec = JobSpec.model_validate(
        {"framework": "torch", "resources": {"gpu_type": "A100", "gpu_count": gpu_count}}
    )
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=spec).job_id


def _busy(settings: Settings, *uuids: str) -> None:
    with session_scope(settings.database_url) as s:
        for u in uuids:
            device_rows.set_current_job(session=s, uuid=u, worker=u, job_id=uuid.uuid4())


def _holder(settings: Settings, job: uuid.UUID) -> str | None:
    with session_scope(settings.database_url) as s:
        found: str | None = s.scalar(
            text("SELECT worker FROM leases WHERE job_id = :j"), {"j": job}
        )
    return found


def _takes_soon(settings: Settings, job: uuid.UUID, device: str) -> threading.Thread:
    """``device``'s worker leasing the single-GPU job 0.3 s from now, on a thread of its own."""

    def take() -> None:
        time.sleep(0.3)
        with session_scope(settings.database_url) as s:
            assert leases.acquire_lease(
                session=s, job_id=job, worker=device, device_uuid=device, ttl=60
            )

    taker = threading.Thread(target=take)
    taker.start()
    return taker


def _identity(device: str) -> WorkerIdentity:
    return WorkerIdentity(worker=device, device_uuid=device, cuda=False)


# -- the rules themselves -------------------------------------------------------------------


def test_the_rules_pick_the_host_that_keeps_gang_room() -> None:
    free = {"host-4": 4, "host-2": 2, "host-1": 1}
    assert single_defers_to(free, "host-4", 2) == "host-1"
    assert single_defers_to(free, "host-2", 2) == "host-1"
    assert single_defers_to(free, "host-1", 2) is None  # already the best place
    assert single_defers_to(free, "host-4", None) is None  # no gang to keep room for
    assert single_defers_to({"host-4": 4, "host-2": 2}, "host-4", 2) is None  # no better host
    assert gang_defers_to(free, "host-4", 2) == "host-2"
    assert gang_defers_to(free, "host-2", 2) is None  # fits exactly
    assert gang_defers_to(free, "host-1", 2) is None  # cannot hold it: the hold rules decide
    assert gang_defers_to({"host-4": 4, "host-2": 1}, "host-4", 2) is None  # nowhere tighter


# -- a single-GPU job leaves gang-sized holes whole -------------------------------------------


def test_a_single_on_a_gang_sized_host_lets_the_one_free_device_take_it(fleet: Settings) -> None:
    _submit(fleet, gpu_count=2)  # a recent gang of 2: the size to keep room for
    job = _submit(fleet)
    taker = _takes_soon(fleet, job, "GPU-c0")
    started = time.monotonic()
    try:
        taken = defer_single(_on(fleet, "host-4", 10.0), "GPU-a0", job)
    finally:
        taker.join()
    # host-1's device took it, well before the 10 s bound; host-4 keeps its 4 free for a gang
    assert taken and time.monotonic() - started < 5.0
    assert _holder(fleet, job) == "GPU-c0"
    assert Dispatcher(fleet).pending(QUEUE) == 1  # the wake-up it sent to host-1's workers


def test_a_single_is_taken_here_after_the_bound_when_no_better_host_leases_it(
    fleet: Settings,
) -> None:
    _submit(fleet, gpu_count=2)
    job = _submit(fleet)
    started = time.monotonic()
    taken = defer_single(_on(fleet, "host-4", 1.0), "GPU-a0", job)
    waited = time.monotonic() - started
    assert not taken and 1.0 <= waited < 5.0, waited  # its bound, then this worker runs it
    with session_scope(fleet.database_url) as s:
        assert leases.acquire_lease(
            session=s, job_id=job, worker="GPU-a0", device_uuid="GPU-a0", ttl=60
        )
    # and the lease still decides: the better host's late try finds it taken
    with session_scope(fleet.database_url) as s:
        assert not leases.acquire_lease(
            session=s, job_id=job, worker="GPU-c0", device_uuid="GPU-c0", ttl=60
        )


def test_a_single_does_not_defer_without_a_gang_or_a_better_host(fleet: Settings) -> None:
    sent: list[str] = []

    def send(job_id: uuid.UUID, queue: str, priority: int) -> bool:
        sent.append(queue)
        return True

    # no gang submitted recently: nothing to keep room for
    assert not defer_single(_on(fleet, "host-4", 1.0), "GPU-a0", _submit(fleet), send=send)
    _submit(fleet, gpu_count=2)
    # host-1 is already the best place
    assert not defer_single(_on(fleet, "host-1", 1.0), "GPU-c0", _submit(fleet), send=send)
    # host-1's device kept for a waiting gang: not free, so the hold is never undercut
    with session_scope(fleet.database_url) as s:
        s.execute(
            text(
                "UPDATE devices SET reserved_for = :j, reserved_until = now() + interval '1 min'"
                " WHERE uuid = 'GPU-c0'"
            ),
            {"j": uuid.uuid4()},
        )
    assert not defer_single(_on(fleet, "host-4", 1.0), "GPU-a0", _submit(fleet), send=send)
    with session_scope(fleet.database_url) as s:
        s.execute(text("UPDATE devices SET reserved_for = NULL, reserved_until = NULL"))
    # host-1's device busy: no host's free device breaks up no gang's room
    _busy(fleet, "GPU-c0")
    assert not defer_single(_on(fleet, "host-4", 1.0), "GPU-a0", _submit(fleet), send=send)
    # off (0 s)
    assert not defer_single(_on(fleet, "host-4", 0.0), "GPU-a0", _submit(fleet), send=send)
    assert sent == []


# -- a gang goes to the host that fits it most tightly ----------------------------------------


def test_a_gang_woken_on_the_big_host_goes_to_the_host_with_exactly_its_room(
    fleet: Settings,
) -> None:
    gang = _submit(fleet, gpu_count=2)
    won_there: list[leases.LeaseGrant | None] = []

    def lead_on_host_2() -> None:
        time.sleep(0.3)
        won_there.append(win(_on(fleet, "host-2", 10.0), _identity("GPU-b0"), gang))

    taker = threading.Thread(target=lead_on_host_2)
    taker.start()
    try:
        here = win(_on(fleet, "host-4", 10.0), _identity("GPU-a0"), gang)
    finally:
        taker.join()
    # host-2 led it on its 2 devices; host-4's 4 stay whole for a bigger gang
    assert here is None
    assert won_there and won_there[0] is not None
    assert set(won_there[0].gang or ()) == set(HOSTS["host-2"])
    with session_scope(fleet.database_url) as s:
        held = s.scalars(text("SELECT uuid FROM devices WHERE gang_job = :j"), {"j": gang}).all()
    assert set(held) == set(HOSTS["host-2"])


def test_a_gang_is_led_here_after_the_bound_when_the_tighter_host_does_not_take_it(
    fleet: Settings,
) -> None:
    gang = _submit(fleet, gpu_count=2)
    started = time.monotonic()
    grant = win(_on(fleet, "host-4", 1.0), _identity("GPU-a0"), gang)
    waited = time.monotonic() - started
    assert grant is not None and 1.0 <= waited < 5.0, waited
    assert set(grant.gang or ()) <= set(HOSTS["host-4"]) and len(grant.gang or ()) == 2
    assert Dispatcher(fleet).pending(QUEUE) == 1  # the wake-up it offered host-2


def test_a_gang_that_fits_its_host_exactly_does_not_wait(fleet: Settings) -> None:
    _busy(fleet, "GPU-a2", "GPU-a3")  # host-4 has 2 free, as tight as host-2
    gang = _submit(fleet, gpu_count=2)
    started = time.monotonic()
    grant = win(_on(fleet, "host-4", 10.0), _identity("GPU-a0"), gang)
    assert grant is not None and time.monotonic() - started < 5.0
    assert Dispatcher(fleet).pending(QUEUE) == 0
