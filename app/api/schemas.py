"""The public shapes of every response, built from the db layer's records.

The OpenAPI document is generated from these, so what it states is what the API answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.db.events import EventRow
from app.db.jobs import JobRecord, LeaseRecord
from app.db.logs import LogChunk
from app.domain.states import JobStatus


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Problem(_Out):
    field: str = Field(description="Where in the request, dotted (e.g. resources.memory_gb).")
    message: str


class ErrorDetail(_Out):
    model_config = ConfigDict(extra="allow")

    code: str = Field(
        description="Machine-readable: unauthorized, forbidden, not_found, ambiguous_id, "
        "invalid_request, idempotency_conflict, already_finished, too_large, unavailable, ..."
    )
    message: str = Field(description="What went wrong and what to do, for a person.")
    problems: list[Problem] | None = Field(default=None, description="Each invalid field (422).")
    candidates: list[str] | None = Field(
        default=None, description="The job ids an ambiguous prefix matches."
    )
    checks: dict[str, str] | None = Field(default=None, description="readyz: each dependency.")


class ErrorBody(_Out):
    error: ErrorDetail


class LeaseOut(_Out):
    epoch: int = Field(description="The fencing epoch of this attempt.")
    worker: str
    device: str | None = Field(description="The GPU's uuid.")
    host: str | None = Field(description="The host of the GPU the attempt ran on.")
    gpu_index: int | None
    gpu_name: str | None
    gpu_type: str | None
    acquired_at: datetime
    expires_at: datetime
    released_at: datetime | None
    outcome: str | None = Field(
        description="succeeded, failed, cancelled, requeued or expired; null while live."
    )

    @classmethod
    def of(cls, lease: LeaseRecord) -> LeaseOut:
        return cls.model_construct(**lease.__dict__)


class CheckpointOut(_Out):
    step: int
    path: str
    saved_at: datetime


class BatchOut(_Out):
    size: int = Field(description="The batch size of the spec.")
    micro_batch: int = Field(description="The micro-batch that last fit in memory.")
    accumulation: int = Field(description="Micro-batches accumulated per optimizer step.")


class GpuOut(_Out):
    peak_memory_gb: float | None
    mean_utilization: float | None


class JobOut(_Out):
    id: uuid.UUID
    name: str
    tenant: str
    status: JobStatus
    spec: dict[str, Any] = Field(description="The spec as stored at submit (never re-validated).")
    spec_version: int = Field(description="The version of the spec rules it was validated by.")
    queue: str = Field(description="gpu.<type>.<tier>, where the job waits.")
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="Tries that count against max_attempts.")
    max_attempts: int
    retry_at: datetime | None
    waiting_reason: str | None = Field(
        description="Why a queued job cannot run on any registered device, or null."
    )
    cancel_requested: bool
    lease: LeaseOut | None = Field(description="The live lease, while the job runs.")
    leases: list[LeaseOut] = Field(description="Every try, oldest first, with its GPU and host.")
    progress: dict[str, Any] | None
    checkpoint: CheckpointOut | None = Field(description="The latest checkpoint.")
    batch: BatchOut
    gpu: GpuOut | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None = Field(description="{kind, message} when the job failed.")

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        """Built without validation: the record's types are these fields' types (the
        schemathesis test checks every response against the document)."""
        checkpoint = job.checkpoint
        return cls.model_construct(
            **{
                **job.__dict__,
                "lease": None if job.lease is None else LeaseOut.of(job.lease),
                "leases": [LeaseOut.of(lease) for lease in job.leases],
                "checkpoint": None
                if checkpoint is None
                else CheckpointOut.model_construct(**checkpoint.__dict__),
                "batch": BatchOut.model_construct(**job.batch.__dict__),
                "gpu": None if job.gpu is None else GpuOut.model_construct(**job.gpu.__dict__),
            }
        )


class JobPage(_Out):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="Pass back as cursor for the next page.")


@dataclass(frozen=True)
class _RecordPage:
    jobs: list[JobRecord]
    next_cursor: str | None


#: JobOut's JSON straight from the db records: JobRecord and its parts have JobOut's fields, in
#: its order, so pydantic-core writes the same bytes without a model per job and its parts
#: (tests/unit/test_job_json.py holds the two to byte equality). A list page of 50 spent more
#: time building JobOut models than reading its rows.
_JOB = TypeAdapter(JobRecord)
_PAGE = TypeAdapter(_RecordPage)


def job_json(record: JobRecord) -> bytes:
    """``JobOut.of(record).model_dump_json()``, faster."""
    return _JOB.dump_json(record)


def job_page_json(records: list[JobRecord], next_cursor: str | None) -> bytes:
    """``JobPage(jobs=[JobOut.of(r) ...], next_cursor=...).model_dump_json()``, faster."""
    return _PAGE.dump_json(_RecordPage(jobs=records, next_cursor=next_cursor))


class EventOut(_Out):
    seq: int = Field(description="Per job, gap-free, in commit order: the stream's event id.")
    at: datetime
    kind: str
    epoch: int | None
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: EventRow) -> EventOut:
        return cls(**row.__dict__)


class EventPage(_Out):
    events: list[EventOut]
    next_cursor: str | None = Field(
        description="Pass back as cursor for later events; null when this page holds the last "
        "event stored so far."
    )


class LogChunkOut(_Out):
    seq: int = Field(description="Per job, gap-free, in commit order.")
    epoch: int = Field(description="The attempt (lease epoch) that wrote it.")
    at: datetime
    text: str

    @classmethod
    def of(cls, chunk: LogChunk) -> LogChunkOut:
        return cls(**chunk.__dict__)


class LogPage(_Out):
    logs: list[LogChunkOut]
    text: str = Field(description="The chunks of this page joined.")
    next_cursor: str | None


class DeviceOut(_Out):
    model_config = ConfigDict(extra="allow")

    uuid: str
    host: str
    index: int
    name: str
    type: str
    memory_gb: float
    pci_bus_id: str
    simulated: bool
    worker: str | None
    alive: bool
    current_job: str | None = Field(
        description="The job it runs: shown only to its tenant and to admins."
    )
    gang: bool = Field(
        default=False,
        description="Held by a multi-GPU job's gang (every member shows the gang's job).",
    )
    sample: dict[str, Any] | None
    sampled_at: datetime | None
    heartbeat_at: datetime | None
    suspect: bool = Field(
        default=False,
        description="Marked suspect after a GPU fault: takes no job until its health check passes.",
    )
    suspect_since: datetime | None = None
    suspect_reason: str | None = None
    frameworks: dict[str, str] | None = Field(
        default=None, description="Frameworks its worker offers, name -> version."
    )


class DeviceList(_Out):
    devices: list[DeviceOut]


class DeviceFit(_Out):
    uuid: str
    host: str
    index: int
    type: str
    memory_gb: float
    worker: str | None
    alive: bool
    suspect: bool = Field(description="Marked suspect after a GPU fault; takes no job yet.")
    frameworks: list[str] = Field(description="Frameworks its worker offers.")


class Validation(_Out):
    valid: bool
    queue: str
    fits: list[DeviceFit] = Field(description="Registered devices that could run the job.")
    waiting_reason: str | None


class DeviceCounts(_Out):
    devices: int
    busy: int
    idle: int


class FleetDevices(_Out):
    registered: int
    alive: int
    busy: int
    idle: int
    suspect: int = Field(description="Alive devices marked suspect after a GPU fault.")
    by_type: dict[str, DeviceCounts]
    by_host: dict[str, DeviceCounts]


class Fleet(_Out):
    scope: str = Field(description="'fleet' (an admin: every tenant) or 'tenant' (your jobs).")
    devices: FleetDevices
    jobs: dict[str, int] = Field(description="Jobs by status, in the scope.")
    queues: dict[str, int] = Field(description="Queued jobs per queue, in the scope.")
    utilization: float | None
    simulated: bool


class Health(_Out):
    status: str


class Ready(_Out):
    status: str
    checks: dict[str, str]
