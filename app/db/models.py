"""SQLAlchemy models: jobs, their leases, checkpoints, events and logs, and devices.

Only ``app.db`` changes these rows. The schema itself enforces what must never happen: a
partial unique index allows at most one live lease per job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.domain.states import JobStatus, LeaseOutcome

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _enum(cls: type[Any], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e])


TZ = DateTime(timezone=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    tenant: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    #: one queue, or a job's alternatives' queues separated by spaces (``routing.job_queue``).
    queue: Mapped[str] = mapped_column(String(500))
    priority: Mapped[int] = mapped_column(SmallInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    spec_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer)
    retry_at: Mapped[datetime | None] = mapped_column(TZ)
    #: when the wake-up was last sent; the reaper sends it again when it is old.
    dispatched_at: Mapped[datetime | None] = mapped_column(TZ)
    #: fencing counter: bumped by every lease and every reap, never decreases.
    epoch: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    #: the micro-batch that last worked (after OOM backoff); later attempts start there.
    micro_batch: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    gpu_peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_util_sum: Mapped[float] = mapped_column(Float, server_default=text("0"))
    gpu_util_samples: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    #: the version of the spec schema the job was validated against at submit; a stored spec
    #: is never validated again (a later, stricter schema must not break old jobs).
    spec_version: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    #: the last sequence number given to one of the job's events / log chunks. Bumped in the
    #: transaction that inserts the row, which holds the job's row lock until it commits: the
    #: numbers are gap-free and commit in order, so a reader's cursor never skips a row.
    event_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    log_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    #: when retention deleted the ended job's history (events, logs, leases, older
    #: checkpoints); the row and its summary stay (``app.db.retention``).
    pruned_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_status_dispatched", "status", "dispatched_at"),
        # The indexes below serve the hot statements (tests/integration/test_query_plans.py).
        # The outbox: due queued jobs of a queue, in dispatch order (reaping.py).
        Index(
            "ix_jobs_queued_dispatch",
            "queue",
            text("dispatched_at NULLS FIRST"),
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued' AND NOT cancel_requested"),
            postgresql_include=["retry_at"],
        ),
        # The outbox's jobs with alternative types, which wait in several queues at once.
        Index(
            "ix_jobs_queued_alternatives",
            text("dispatched_at NULLS FIRST"),
            text("priority DESC"),
            "created_at",
            postgresql_where=text(
                "status = 'queued' AND NOT cancel_requested AND strpos(queue, ' ') > 0"
            ),
        ),
        # Queued jobs still waiting out a retry backoff (the reaper's due count subtracts them).
        Index(
            "ix_jobs_retry_waiting",
            "queue",
            "retry_at",
            postgresql_where=text("status = 'queued' AND retry_at IS NOT NULL"),
        ),
        Index(
            "ix_jobs_max_wait",
            "created_at",
            postgresql_where=text(
                "status = 'queued' AND NOT cancel_requested AND started_at IS NULL "
                "AND jsonb_typeof(spec -> 'max_wait') = 'number'"
            ),
        ),
        # List pages, newest first: a tenant's by status, and an admin's.
        Index("ix_jobs_tenant_status_created", "tenant", "status", "created_at", "id"),
        Index("ix_jobs_created", "created_at", "id"),
        # Retention: ended jobs whose history is still kept, oldest end first.
        Index(
            "ix_jobs_retention_due",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL AND pruned_at IS NULL"),
        ),
    )


class Lease(Base):
    """One row per attempt: who ran the job under which epoch, and how it ended."""

    __tablename__ = "leases"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(BigInteger)
    worker: Mapped[str] = mapped_column(String(200))
    device_uuid: Mapped[str | None] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(TZ)
    released_at: Mapped[datetime | None] = mapped_column(TZ)
    outcome: Mapped[LeaseOutcome | None] = mapped_column(_enum(LeaseOutcome, "lease_outcome"))
    #: the trainer's latest progress in this attempt, sent with the heartbeat (a narrow row:
    #: the jobs row carries the spec). A job shows its newest lease's, else ``Job.progress``.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    __table_args__ = (
        UniqueConstraint("job_id", "epoch"),
        # At most one live lease per job, whatever the code above tries.
        Index(
            "uq_leases_one_live_per_job",
            "job_id",
            unique=True,
            postgresql_where=text("released_at IS NULL"),
        ),
        Index("ix_leases_live_expiry", "expires_at", postgresql_where=text("released_at IS NULL")),
    )


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    saved_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    #: the file's sha256 and size, and its key in the store once uploaded there (None: the
    #: checkpoint stays on the host that wrote it).
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    storage_key: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),)


class Artifact(Base):
    """A file a job left in its output directory, uploaded to the store at its success."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(BigInteger)
    #: a relative, ``/``-separated path under the output directory.
    name: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (UniqueConstraint("job_id", "name"),)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    kind: Mapped[str] = mapped_column(String(50))
    epoch: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(Text, server_default=text("''"))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    #: per-job, gap-free, in commit order (see ``Job.event_seq``): the stream cursor.
    seq: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_job_events_job_id", "job_id", "id"),
        UniqueConstraint("job_id", "seq"),
    )


class JobLog(Base):
    """The trainer's output, in chunks, per attempt (epoch)."""

    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    chunk: Mapped[str] = mapped_column(Text)
    #: per-job, gap-free, in commit order (see ``Job.log_seq``): the stream cursor.
    seq: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_job_logs_job_id", "job_id", "id"),
        UniqueConstraint("job_id", "seq"),
    )


class FleetCounter(Base):
    """Jobs per tenant, queue and status (``what='job'``), and counted events per kind
    (``what='event'``, tenant and queue empty), as folded by the reaper; the rows of
    ``FleetCounterDelta`` not folded yet are added to it on reading (``app.db.counters``)."""

    __tablename__ = "fleet_counters"

    what: Mapped[str] = mapped_column(String(20), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    queue: Mapped[str] = mapped_column(String(500), primary_key=True)
    status: Mapped[str] = mapped_column(String(50), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class FleetCounterDelta(Base):
    """+1/-1, appended by triggers (migration 0006) in the transaction that changed a job's
    status or inserted a counted event."""

    __tablename__ = "fleet_counter_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    what: Mapped[str] = mapped_column(String(20))
    tenant: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(50))
    delta: Mapped[int] = mapped_column(Integer)


class Device(Base):
    """A GPU of some host. Workers claim devices like jobs: a lease with heartbeat and expiry."""

    __tablename__ = "devices"

    uuid: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    gpu_type: Mapped[str] = mapped_column(String(50))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    pci_bus_id: Mapped[str] = mapped_column(String(100))
    simulated: Mapped[bool] = mapped_column(Boolean)
    registered_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    worker: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(TZ)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TZ)
    expires_at: Mapped[datetime | None] = mapped_column(TZ)
    current_job: Mapped[UUID | None] = mapped_column()
    #: the job whose gang holds this device, and the gang lease's epoch (``app.db.gangs``):
    #: while set, no other job starts here.
    gang_job: Mapped[UUID | None] = mapped_column()
    gang_epoch: Mapped[int | None] = mapped_column(Integer)
    #: kept idle for a waiting gang's job until ``reserved_until`` (``app.db.gangs.reserve``).
    reserved_for: Mapped[UUID | None] = mapped_column()
    reserved_until: Mapped[datetime | None] = mapped_column(TZ)
    last_sample: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    sampled_at: Mapped[datetime | None] = mapped_column(TZ)
    #: set when a job failed with a GPU/driver fault; no job starts here until the device's
    #: keeper finds it healthy again and clears it.
    suspect_since: Mapped[datetime | None] = mapped_column(TZ)
    suspect_reason: Mapped[str | None] = mapped_column(Text)
    #: what the worker holding it can run, ``{"torch": "2.13.0"}``; None: not reported.
    frameworks: Mapped[dict[str, str] | None] = mapped_column(JSONB)

    __table_args__ = (Index("ix_devices_host_index", "host", "index"),)
