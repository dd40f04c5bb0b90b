"""A job's JSON written straight from its record is byte for byte JobOut's."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.api.schemas import (
    BatchOut,
    CheckpointOut,
    GpuOut,
    JobOut,
    JobPage,
    LeaseOut,
    job_json,
    job_page_json,
)
from app.db.jobs import BatchRecord, CheckpointRecord, GpuRecord, JobRecord, LeaseRecord
from app.domain.states import JobStatus

AT = datetime(2026, 11, 26, 21, 0, 0, 123456, tzinfo=UTC)


def _lease(epoch: int, released: bool) -> LeaseRecord:
    return LeaseRecord(
        epoch=epoch,
        worker="w1",
        device="GPU-1",
        host="h1",
        gpu_index=0,
        gpu_name="NVIDIA A100",
        gpu_type="A100",
        acquired_at=AT,
        expires_at=AT + timedelta(seconds=30),
        released_at=AT + timedelta(seconds=5) if released else None,
        outcome="requeued" if released else None,
    )


def _record(**changes: object) -> JobRecord:
    live = _lease(2, released=False)
    record = JobRecord(
        id=uuid.uuid4(),
        name='j \u00e9\u2603 "quoted"',
        tenant="t",
        status=JobStatus.RUNNING,
        spec={"name": "j", "resources": {"gpu_type": ["A100", "T4"], "memory_gb": 8.5}},
        spec_version=3,
        queue="gpu.A100.80",
        priority=5,
        created_at=AT,
        started_at=AT.astimezone(timezone(timedelta(hours=2))),
        finished_at=None,
        attempts=1,
        max_attempts=3,
        retry_at=datetime(2026, 1, 1, tzinfo=UTC),
        waiting_reason=None,
        cancel_requested=False,
        lease=live,
        leases=[_lease(1, released=True), live],
        progress={"step": 10, "loss": 0.25},
        checkpoint=CheckpointRecord(step=10, path="/ckpt/10", saved_at=AT),
        batch=BatchRecord(size=64, micro_batch=16, accumulation=4),
        gpu=GpuRecord(peak_memory_gb=1.5, mean_utilization=None),
        result=None,
        error={"kind": "oom", "message": "x"},
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        _record(),
        _record(
            status=JobStatus.QUEUED,
            lease=None,
            leases=[],
            checkpoint=None,
            gpu=None,
            progress=None,
            waiting_reason="no devices are registered",
            error=None,
            result={"loss": 1e-9},
        ),
    ],
)
def test_a_job_is_written_as_jobout_writes_it(record: JobRecord) -> None:
    assert job_json(record) == JobOut.of(record).model_dump_json().encode()
    page = JobPage(jobs=[JobOut.of(record), JobOut.of(record)], next_cursor="1_ab")
    assert job_page_json([record, record], "1_ab") == page.model_dump_json().encode()
    empty = JobPage(jobs=[], next_cursor=None).model_dump_json().encode()
    assert job_page_json([], None) == empty


@pytest.mark.parametrize(
    ("record_type", "model"),
    [
        (JobRecord, JobOut),
        (LeaseRecord, LeaseOut),
        (CheckpointRecord, CheckpointOut),
        (BatchRecord, BatchOut),
        (GpuRecord, GpuOut),
    ],
)
def test_records_have_the_public_fields_in_order(record_type: type, model: type[JobOut]) -> None:
    """A field added to one and not the other fails here, not in a client."""
    assert [f.name for f in dataclasses.fields(record_type)] == list(model.model_fields)
