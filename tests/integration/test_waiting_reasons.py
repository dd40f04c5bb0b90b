"""A page of queued jobs costs the same whatever the size of the fleet: the device table is read
counted per kind of device, and each kind of request on the page is judged once.

Before, each queued job of a page was judged against every registered device: a page of 50
queued jobs with 1,000 GPUs registered cost 100,000 ``device_fits`` calls (~250 ms of Python,
which held the GIL from the process's other threads too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.db import devices as device_rows
from app.db import jobs
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import JobStatus
from tests.conftest import device_record

A100S = 300
T4S = 20


def _fleet(url: str) -> None:
    """300 alike A100s (80 GiB, torch) and 20 T4s (15 GiB, torch), every one held by a worker."""
    records = [device_record(f"GPU-a-{i}", index=i) for i in range(A100S)] + [
        device_record(f"GPU-t-{i}", index=i, gpu_type="T4", gib=15) for i in range(T4S)
    ]
    with session_scope(url) as s:
        device_rows.register_devices(session=s, devices=records)
        for r in records:
            assert device_rows.claim_device(
                session=s, uuids=[r.uuid], worker=f"w-{r.uuid}", ttl=600, frameworks={"torch": "2"}
            )


def _submit(url: str, body: dict[str, Any], n: int) -> None:
    spec = JobSpec.model_validate(body)
    with session_scope(url) as s:
        for _ in range(n):
            jobs.submit_job(session=s, tenant="t", spec=spec)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of ``device_fits`` that waiting reasons make."""
    calls = [0]
    real: Callable[..., bool] = jobs.device_fits

    def fits(**kwargs: Any) -> bool:
        calls[0] += 1
        return real(**kwargs)

    monkeypatch.setattr(jobs, "device_fits", fits)
    return calls


def test_the_device_table_is_read_per_kind_of_device(db_url: str) -> None:
    _fleet(db_url)
    with session_scope(db_url) as s:
        kinds = jobs.device_sizes(s)
    assert sorted((d.gpu_type, d.count, d.alive) for d in kinds) == [
        ("A100", A100S, True),
        ("T4", T4S, True),
    ]


def test_a_page_of_queued_jobs_judges_each_kind_of_request_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 320 GPUs of two kinds and 60 queued jobs of three kinds of request
    _fleet(db_url)
    _submit(db_url, {"framework": "torch"}, 20)  # runs on either kind
    _submit(db_url, {"framework": "tensorflow"}, 20)  # no worker offers it
    _submit(db_url, {"framework": "torch", "resources": {"memory_gb": 40}}, 20)  # A100s only
    calls = _counting(monkeypatch)
    # When a tenant lists a page of 50 of them
    with session_scope(db_url) as s:
        page, _ = jobs.list_jobs(
            session=s, tenant="t", status=JobStatus.QUEUED, limit=50, cursor=None
        )
    # Then each kind of request was judged against each kind of device, not each device
    assert len(page) == 50
    assert calls[0] <= 3 * 2 * 2, calls[0]
    # And each job's reason is the one it gets on its own
    with session_scope(db_url) as s:
        for record in page:
            alone = jobs.get_job(session=s, tenant="t", job_id=record.id)
            assert record.waiting_reason == alone.waiting_reason
    reasons = {r.spec["framework"]: r.waiting_reason for r in page}
    assert reasons["torch"] is None
    assert "has framework 'tensorflow'" in (reasons["tensorflow"] or "")


def test_a_suspect_kind_counts_its_devices(db_url: str) -> None:
    # Given three alike GPUs, all suspect after a fault
    records = [device_record(f"GPU-s-{i}", index=i) for i in range(3)]
    with session_scope(db_url) as s:
        device_rows.register_devices(session=s, devices=records)
        for r in records:
            assert device_rows.claim_device(session=s, uuids=[r.uuid], worker="w", ttl=600)
            assert device_rows.mark_suspect(session=s, uuid=r.uuid, worker="w", reason="ECC")
    _submit(db_url, {"framework": "torch"}, 1)
    # When the queued job is read, its reason counts the devices, not their one kind
    with session_scope(db_url) as s:
        (record,), _ = jobs.list_jobs(session=s, tenant="t", status=None, limit=50, cursor=None)
    assert "every device that fits (3) is suspect" in (record.waiting_reason or "")
