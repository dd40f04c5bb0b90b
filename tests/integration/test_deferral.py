"""A worker of a scarce GPU type lets a job go to an idle, more plentiful type (real Postgres
and Redis): the wake-up lands in that type's queue, the wait is bounded, and the job is never
left unrun."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import text

from app.db import devices as device_rows
from app.db import leases
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.queue import Dispatcher
from app.settings import Settings
from tests.conftest import device_record
from workers.deferral import defer_if_scarce

A100 = "GPU-sim-h-0-A100"
T4S = ["GPU-sim-h-1-T4", "GPU-sim-h-2-T4"]


def _fleet(settings: Settings) -> None:
    """One A100 and two T4s, each held by a live worker."""
    records = [device_record(A100, index=0)] + [
        device_record(u, index=i + 1, gpu_type="T4", gib=15) for i, u in enumerate(T4S)
    ]
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=records)
        for record in records:
            assert device_rows.claim_device(
                session=s, uuids=[record.uuid], worker=record.uuid, ttl=60
            )


def _submit(settings: Settings, gpu_type: str = "any", memory_gb: float = 8) -> uuid.UUID:
    spec = JobSpec.model_validate(
        {"framework": "torch", "resources": {"gpu_type": gpu_type, "memory_gb": memory_gb}}
    )
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=spec).job_id


def _t4_takes_it_soon(settings: Settings, job: uuid.UUID) -> threading.Thread:
    """A T4's worker leasing the job 0.3 s from now, on a thread of its own."""

    def take() -> None:
        time.sleep(0.3)
        with session_scope(settings.database_url) as s:
            assert leases.acquire_lease(
                session=s, job_id=job, worker=T4S[0], device_uuid=T4S[0], ttl=60
            )

    taker = threading.Thread(target=take)
    taker.start()
    return taker


def _fast(settings: Settings, defer_s: float = 1.0) -> Settings:
    return settings.model_copy(update={"scarce_defer_s": defer_s})


def test_the_scarce_device_sends_the_wake_up_to_the_plentiful_queue_and_waits_its_bound(
    settings: Settings,
) -> None:
    _fleet(settings)
    job = _submit(settings)
    started = time.monotonic()
    taken = defer_if_scarce(_fast(settings), A100, job)
    waited = time.monotonic() - started
    assert not taken  # nobody leased it: this worker takes it after the bound
    assert 1.0 <= waited < 3.0, waited  # its 1 s bound, not the lease's wait
    # the real wake-up, in the T4 workers' queue
    assert Dispatcher(settings).pending("gpu.T4.8") == 1


def test_the_wait_ends_as_soon_as_a_plentiful_device_leases_the_job(settings: Settings) -> None:
    _fleet(settings)
    job = _submit(settings)

    taker = _t4_takes_it_soon(settings, job)
    started = time.monotonic()
    taken = defer_if_scarce(_fast(settings, defer_s=5.0), A100, job)
    taker.join()
    assert taken and time.monotonic() - started < 3.0  # well before its 5 s bound


def test_no_deferral_when_it_would_not_keep_a_scarce_gpu_free(settings: Settings) -> None:
    _fleet(settings)
    sent: list[str] = []

    def send(job_id: uuid.UUID, queue: str, priority: int) -> bool:
        sent.append(queue)
        return True

    fast = _fast(settings)
    # a T4 is the plentiful type itself; an A100-only job; a job too big for a T4
    assert not defer_if_scarce(fast, T4S[0], _submit(settings), send=send)
    assert not defer_if_scarce(fast, A100, _submit(settings, gpu_type="A100"), send=send)
    assert not defer_if_scarce(fast, A100, _submit(settings, memory_gb=40), send=send)
    # both T4s busy
    with session_scope(settings.database_url) as s:
        for t4 in T4S:
            device_rows.set_current_job(session=s, uuid=t4, worker=t4, job_id=uuid.uuid4())
    assert not defer_if_scarce(fast, A100, _submit(settings), send=send)
    assert sent == []


def test_a_database_error_means_run_it_here(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    )
    assert not defer_if_scarce(broken, A100, uuid.uuid4())


def test_the_task_defers_before_it_leases_and_skips_a_job_taken_meanwhile(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_job`` on the scarce A100's worker: the T4 that takes the job meanwhile runs it,
    and the A100's task ends without a lease of its own."""
    from app.settings import get_settings
    from workers import identity, tasks

    _fleet(settings)
    job = _submit(settings)
    monkeypatch.setattr(tasks, "get_settings", lambda: _fast(settings, defer_s=5.0))
    for name in identity.NAMES:  # restored as they were when the test ends
        monkeypatch.delenv(name, raising=False)
    identity.export(identity.WorkerIdentity(worker=A100, device_uuid=A100, cuda=False))
    get_settings.cache_clear()

    taker = _t4_takes_it_soon(settings, job)
    try:
        assert tasks.run_job_now(str(job)) == "skipped"
    finally:
        taker.join()
    with session_scope(settings.database_url) as s:
        holder = s.scalar(text("SELECT worker FROM leases WHERE job_id = :j"), {"j": job})
    assert holder == T4S[0]
