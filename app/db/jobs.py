"""Submitting, reading, listing and cancelling jobs (the user's side of the jobs table).

Reads return ``JobRecord`` dataclasses; the API builds the public shapes from them. A job, its
lease history and its latest checkpoint come from one statement, and a page of jobs from one
statement plus one read of the device table (only when a job on it is queued): the cost of a
page does not grow with the number of jobs on it. A stored spec is never validated again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
import uuid
from collections import namedtuple
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, bindparam, column, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TextualSelect

from app.db import counters
from app.db.driver import driver_sql, fetch_all
from app.db.events import add_event
from app.db.models import Device, Job
from app.domain.routing import (
    DEFAULT_FRAMEWORK,
    RoutingError,
    describe_types,
    device_fits,
)
from app.domain.spec import SPEC_VERSION, JobSpec
from app.domain.states import EventKind, JobStatus


class IdempotencyConflict(Exception):
    """This Idempotency-Key was already used with a different job body."""


class JobNotFound(Exception):
    """No such job for this tenant."""


class JobAlreadyFinished(Exception):
    """The job has already finished; there is nothing to cancel."""


class AmbiguousJobId(Exception):
    """A job id prefix matches more than one of the tenant's jobs."""

    def __init__(self, prefix: str, candidates: list[uuid.UUID]) -> None:
        shown = ", ".join(str(c) for c in candidates)
        super().__init__(f"job id prefix {prefix!r} is ambiguous: it matches {shown}")
        self.candidates = candidates


@dataclass(frozen=True)
class Submitted:
    job_id: uuid.UUID
    created: bool  #: False when an Idempotency-Key returned an earlier job
    record: JobRecord | None = None  #: the new job (None for an earlier one)


@dataclass(frozen=True)
class LeaseRecord:
    epoch: int
    worker: str
    device: str | None
    host: str | None  #: the device's host, when the device is registered
    gpu_index: int | None
    gpu_name: str | None
    gpu_type: str | None
    acquired_at: datetime
    expires_at: datetime
    released_at: datetime | None
    outcome: str | None


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: str
    saved_at: datetime


@dataclass(frozen=True)
class BatchRecord:
    size: int
    micro_batch: int
    accumulation: int


@dataclass(frozen=True)
class GpuRecord:
    peak_memory_gb: float | None
    mean_utilization: float | None


@dataclass(frozen=True)
class JobRecord:
    id: uuid.UUID
    name: str
    tenant: str
    status: JobStatus
    spec: dict[str, Any]
    spec_version: int
    queue: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    retry_at: datetime | None
    waiting_reason: str | None
    cancel_requested: bool
    lease: LeaseRecord | None  #: the live lease
    leases: list[LeaseRecord]
    progress: dict[str, Any] | None
    checkpoint: CheckpointRecord | None
    batch: BatchRecord
    gpu: GpuRecord | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


def spec_hash(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


#: the columns a job select (and a submit's insert) returns, in order. Declared, they let
#: SQLAlchemy keep a statement's result metadata with its compiled form instead of matching
#: 24 names on every execution.
_SELECT_COLUMNS = [
    "id",
    "name",
    "tenant",
    "status",
    "spec",
    "spec_version",
    "queue",
    "priority",
    "created_at",
    "started_at",
    "finished_at",
    "attempts",
    "max_attempts",
    "retry_at",
    "cancel_requested",
    "progress",
    "micro_batch",
    "result",
    "error",
    "gpu_peak_memory_bytes",
    "gpu_util_sum",
    "gpu_util_samples",
    "leases",
    "checkpoint",
]


def _selecting(sql: str) -> TextualSelect:
    return text(sql).columns(*(column(name) for name in _SELECT_COLUMNS))


#: a job statement's row as psycopg returns it (``app.db.driver``), as ``_record`` reads it.
_JobRow = namedtuple("_JobRow", _SELECT_COLUMNS)  # type: ignore[misc]


_INSERT_SQL = text(
    """
    WITH j AS (
        INSERT INTO jobs (id, tenant, name, status, spec, spec_version, queue, priority,
                          idempotency_key, spec_hash, max_attempts, dispatched_at, event_seq)
        VALUES (:id, :tenant, :name, 'queued', :spec, :spec_version, :queue, :priority,
                :idempotency_key, :spec_hash, :max_attempts, now(), 1)
        ON CONFLICT (tenant, idempotency_key) DO NOTHING
        RETURNING *),
    e AS (
        INSERT INTO job_events (job_id, seq, kind, data)
        SELECT id, 1, 'submitted', :event_data FROM j)
    SELECT j.id, j.name, j.tenant, j.status, j.spec, j.spec_version, j.queue, j.priority,
           j.created_at, j.started_at, j.finished_at, j.attempts, j.max_attempts, j.retry_at,
           j.cancel_requested, j.progress, j.micro_batch, j.result, j.error,
           j.gpu_peak_memory_bytes, j.gpu_util_sum, j.gpu_util_samples,
           '[]'::json AS leases, NULL::json AS checkpoint
      FROM j
    """
).bindparams(bindparam("spec", type_=JSONB), bindparam("event_data", type_=JSONB))
_INSERT = _INSERT_SQL.columns(*(column(name) for name in _SELECT_COLUMNS))


def _insert_params(tenant: str, spec: JobSpec, idempotency_key: str | None) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "tenant": tenant,
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "spec_version": SPEC_VERSION,
        "queue": spec.queue,
        "priority": spec.priority,
        "idempotency_key": idempotency_key,
        "spec_hash": spec_hash(spec),
        "max_attempts": spec.max_attempts,
        "event_data": {"queue": spec.queue},
    }


def _earlier(
    session: Session | Connection, tenant: str, idempotency_key: str | None, digest: str
) -> Submitted:
    """The job an earlier submit with this key made (its body must be this one)."""
    earlier = session.execute(
        select(Job.id, Job.spec_hash).where(
            Job.tenant == tenant, Job.idempotency_key == idempotency_key
        )
    ).one()
    if earlier.spec_hash != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} was used for job {earlier.id} "
            "with a different body"
        )
    return Submitted(job_id=earlier.id, created=False)


def submit_job(
    *,
    session: Session,
    tenant: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    device_max_age: float = 0,
) -> Submitted:
    """Insert a queued job and its ``submitted`` event (seq 1) in one statement; with a key
    already used, return the earlier job instead. A new job's record comes back with it."""
    params = _insert_params(tenant, spec, idempotency_key)
    row = session.execute(_INSERT, params).one_or_none()
    if row is None:
        return _earlier(session, tenant, idempotency_key, params["spec_hash"])
    record = _records(session, [row], device_max_age)[0]
    return Submitted(job_id=row.id, created=True, record=record)


_INSERT_DRIVER = driver_sql(_INSERT)


def insert_job(
    *,
    connection: Connection,
    tenant: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    device_max_age: float = 0,
) -> Submitted:
    """``submit_job`` on a connection in autocommit, through psycopg's cursor
    (``app.db.driver``): the statement commits by itself, one round trip instead of three
    (BEGIN, the statement, COMMIT). The API's ``POST /v1/jobs``."""
    params = _insert_params(tenant, spec, idempotency_key)
    sent = {**params, "spec": Jsonb(params["spec"]), "event_data": Jsonb(params["event_data"])}
    rows = fetch_all(connection, _INSERT_DRIVER, sent)
    if not rows:
        return _earlier(connection, tenant, idempotency_key, params["spec_hash"])
    row: Any = _JobRow._make(rows[0])
    record = _records(connection, [row], device_max_age)[0]
    return Submitted(job_id=row.id, created=True, record=record)


def cancel_job(*, session: Session, tenant: str | None, job_id: uuid.UUID) -> JobStatus:
    """Cancel a queued job at once; ask a running one to stop at its next step. ``tenant``
    None: any tenant's job (an admin)."""
    scope = [] if tenant is None else [Job.tenant == tenant]
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            *scope,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .values(
            cancel_requested=True,
            status=text("CASE WHEN status = 'queued' THEN 'cancelled'::job_status ELSE status END"),
            finished_at=text("CASE WHEN status = 'queued' THEN now() ELSE finished_at END"),
            error=text(
                "CASE WHEN status = 'queued' THEN "
                """'{"kind": "cancelled", "message": "cancelled before it ran"}'::jsonb """
                "ELSE error END"
            ),
        )
        .returning(Job.status, Job.epoch)
    ).one_or_none()
    if row is None:
        status = session.scalar(select(Job.status).where(Job.id == job_id, *scope))
        if status is None:
            raise JobNotFound(f"job {job_id} not found")
        raise JobAlreadyFinished(f"job {job_id} is already {status.value}")
    kind = EventKind.CANCELLED if row.status == JobStatus.CANCELLED else EventKind.CANCEL_REQUESTED
    add_event(session=session, job_id=job_id, kind=kind, epoch=row.epoch)
    return JobStatus(row.status)


def job_queue_info(*, session: Session, job_id: uuid.UUID) -> tuple[str, int] | None:
    row = session.execute(select(Job.queue, Job.priority).where(Job.id == job_id)).one_or_none()
    return None if row is None else (row.queue, row.priority)


_PREFIX_RE = re.compile(r"^[0-9a-f]{4,32}$")
#: a prefix never lists more candidates than this in its error.
MAX_CANDIDATES = 10


def resolve_job_id(*, session: Session, tenant: str | None, raw: str) -> uuid.UUID:
    """A full job id, or a unique prefix of one of the tenant's jobs (at least 4 hex digits,
    dashes optional, as git takes commit ids). ``tenant`` None: every tenant (an admin)."""
    try:
        full = uuid.UUID(raw)
    except ValueError:
        pass
    else:
        if not job_tenant_exists(session=session, tenant=tenant, job_id=full):
            raise JobNotFound(f"job {raw} not found")
        return full
    digits = raw.strip().lower().replace("-", "")
    if not _PREFIX_RE.match(digits):
        raise JobNotFound(
            f"job {raw!r} not found (not a job id, nor a prefix of at least 4 hex digits)"
        )
    # The prefix is a range of the primary key: an index scan, not a scan of the tenant's jobs.
    low = uuid.UUID(digits.ljust(32, "0"))
    high = uuid.UUID(digits.ljust(32, "f"))
    query = select(Job.id).where(Job.id >= low, Job.id <= high)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    found = list(session.scalars(query.order_by(Job.id).limit(MAX_CANDIDATES + 1)))
    if not found:
        raise JobNotFound(f"job {raw!r} not found")
    if len(found) > 1:
        raise AmbiguousJobId(raw, found[:MAX_CANDIDATES])
    return found[0]


def job_tenant_exists(*, session: Session, tenant: str | None, job_id: uuid.UUID) -> bool:
    query = select(Job.id).where(Job.id == job_id)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return session.scalar(query) is not None


@dataclass(frozen=True)
class FleetDevice:
    """Registered devices alike as a waiting job's reason sees them (one row per kind)."""

    gpu_type: str
    memory_bytes: int
    alive: bool  #: a worker holds it now
    suspect: bool
    #: what its (last) worker offered, name -> version; None: not reported.
    frameworks: dict[str, str] | None
    #: how many registered devices are of this kind.
    count: int = 1


_DeviceSizes = list[FleetDevice]


def device_sizes(session: Session | Connection) -> _DeviceSizes:
    """The registered devices (type, memory, liveness, suspicion, frameworks), counted per
    kind in one read: a fleet of 1,000 alike GPUs is one row, so a waiting reason judges a
    handful of kinds, not every device (``_records`` gives one to each queued job of a page).
    """
    alive = func.coalesce(Device.expires_at >= func.now(), False).label("alive")
    suspect = Device.suspect_since.is_not(None).label("suspect")
    rows = session.execute(
        select(
            Device.gpu_type,
            Device.memory_bytes,
            alive,
            suspect,
            Device.frameworks,
            func.count().label("n"),
        ).group_by(Device.gpu_type, Device.memory_bytes, alive, suspect, Device.frameworks)
    ).all()
    return [
        FleetDevice(
            gpu_type=r.gpu_type,
            memory_bytes=r.memory_bytes,
            alive=bool(r.alive),
            suspect=bool(r.suspect),
            frameworks=r.frameworks,
            count=int(r.n),
        )
        for r in rows
    ]


def _fitting(spec: dict[str, Any], devices: _DeviceSizes) -> list[FleetDevice]:
    """The devices of the stored spec's type and size (read from the spec, never validated
    again; a spec stored under older rules fits nothing now)."""
    resources = spec.get("resources") or {}
    job_type = resources.get("gpu_type", "any")
    memory_gb = float(resources.get("memory_gb", 8))
    try:
        return [
            d
            for d in devices
            if device_fits(
                device_type=d.gpu_type,
                device_memory_gib=d.memory_bytes / 2**30,
                job_type=job_type,
                job_memory_gb=memory_gb,
            )
        ]
    except RoutingError:
        return []


def _types_text(stored: Any) -> str:
    """A stored spec's ``gpu_type`` as messages name it (``V100 or T4``)."""
    try:
        return describe_types(stored)
    except (RoutingError, TypeError):
        return str(stored)


def no_fit_reason(spec: dict[str, Any], devices: _DeviceSizes) -> str | None:
    """Why no registered device could ever run a job with this stored spec, or None."""
    if not devices:
        return "no devices are registered: start a worker (gpufleet worker)"
    if _fitting(spec, devices):
        return None
    resources = spec.get("resources") or {}
    have = ", ".join(sorted({f"{d.gpu_type}:{d.memory_bytes / 2**30:.0f}GiB" for d in devices}))
    return (
        f"no registered device fits gpu_type={_types_text(resources.get('gpu_type', 'any'))} "
        f"memory_gb={float(resources.get('memory_gb', 8)):g} (devices: {have})"
    )


def fitting_reason(spec: dict[str, Any], fitting: list[FleetDevice]) -> str | None:
    """Why a job waits although devices of its type and size are registered: none of their
    workers offers its framework, or every one that does is suspect.

    The framework is judged on the fitting devices whose workers reported what they offer,
    the live ones when there are any (a stopped worker's list may be stale).
    """
    framework = str(spec.get("framework") or DEFAULT_FRAMEWORK)
    known = [d for d in fitting if d.frameworks is not None]
    live = [d for d in known if d.alive]
    judged = live or known
    if judged and not any(framework in (d.frameworks or {}) for d in judged):
        offers = sorted({name for d in judged for name in d.frameworks or {}})
        who = "live worker" if live else "worker"
        return (
            f"no {who} of a device that fits has framework {framework!r} "
            f"(they offer: {', '.join(offers) or 'none'}); "
            f"start a worker that can import {framework}"
        )
    usable = [d for d in fitting if d.frameworks is None or framework in d.frameworks]
    if usable and all(d.suspect for d in usable):
        return (
            f"every device that fits ({sum(d.count for d in usable)}) is suspect after a GPU "
            "fault; they take jobs again once their health check passes"
        )
    return None


def waiting_reason(spec: dict[str, Any], devices: _DeviceSizes) -> str | None:
    """Why a queued job is not running when no registered device could run it now: none of
    the type and size, or none with its framework, or all of those suspect."""
    return no_fit_reason(spec, devices) or fitting_reason(spec, _fitting(spec, devices))


_SELECT = """
SELECT j.id, j.name, j.tenant, j.status, j.spec, j.spec_version, j.queue, j.priority,
       j.created_at, j.started_at, j.finished_at, j.attempts, j.max_attempts, j.retry_at,
       j.cancel_requested,
       coalesce((SELECT l.progress FROM leases l WHERE l.job_id = j.id AND l.progress IS NOT NULL
                  ORDER BY l.epoch DESC LIMIT 1), j.progress) AS progress,
       j.micro_batch, j.result, j.error,
       j.gpu_peak_memory_bytes, j.gpu_util_sum, j.gpu_util_samples,
       (SELECT coalesce(json_agg(json_build_object(
                   'epoch', l.epoch, 'worker', l.worker, 'device', l.device_uuid,
                   'host', d.host, 'gpu_index', d.index, 'gpu_name', d.name,
                   'gpu_type', d.gpu_type, 'acquired_at', l.acquired_at,
                   'expires_at', l.expires_at, 'released_at', l.released_at,
                   'outcome', l.outcome) ORDER BY l.epoch), '[]'::json)
          FROM leases l LEFT JOIN devices d ON d.uuid = l.device_uuid
         WHERE l.job_id = j.id) AS leases,
       (SELECT json_build_object('step', c.step, 'path', c.path, 'saved_at', c.saved_at)
          FROM checkpoints c WHERE c.job_id = j.id
         ORDER BY c.step DESC, c.id DESC LIMIT 1) AS checkpoint
  FROM jobs j
"""


def _ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _lease(raw: dict[str, Any]) -> LeaseRecord:
    acquired, expires = _ts(raw["acquired_at"]), _ts(raw["expires_at"])
    assert acquired is not None and expires is not None
    return LeaseRecord(
        epoch=raw["epoch"],
        worker=raw["worker"],
        device=raw["device"],
        host=raw["host"],
        gpu_index=raw["gpu_index"],
        gpu_name=raw["gpu_name"],
        gpu_type=raw["gpu_type"],
        acquired_at=acquired,
        expires_at=expires,
        released_at=_ts(raw["released_at"]),
        outcome=raw["outcome"],
    )


def _record(row: Any, waiting: str | None) -> JobRecord:
    status = JobStatus(row.status)
    leases = [_lease(raw) for raw in row.leases]
    live = next((lease for lease in leases if lease.released_at is None), None)
    checkpoint = None
    if row.checkpoint is not None:
        saved_at = _ts(row.checkpoint["saved_at"])
        assert saved_at is not None
        checkpoint = CheckpointRecord(
            step=row.checkpoint["step"], path=row.checkpoint["path"], saved_at=saved_at
        )
    batch_size = int((row.spec.get("training") or {}).get("batch_size", 1))
    micro = row.micro_batch or batch_size
    gpu = None
    if row.gpu_util_samples or row.gpu_peak_memory_bytes is not None:
        gpu = GpuRecord(
            peak_memory_gb=None
            if row.gpu_peak_memory_bytes is None
            else round(row.gpu_peak_memory_bytes / 1e9, 3),
            mean_utilization=None
            if not row.gpu_util_samples
            else round(row.gpu_util_sum / row.gpu_util_samples, 4),
        )
    return JobRecord(
        id=row.id,
        name=row.name,
        tenant=row.tenant,
        status=status,
        spec=row.spec,
        spec_version=row.spec_version,
        queue=row.queue,
        priority=row.priority,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        retry_at=row.retry_at,
        waiting_reason=waiting,
        cancel_requested=row.cancel_requested,
        lease=live,
        leases=leases,
        progress=row.progress,
        checkpoint=checkpoint,
        batch=BatchRecord(size=batch_size, micro_batch=micro, accumulation=-(-batch_size // micro)),
        gpu=gpu,
        result=row.result,
        error=row.error,
    )


#: the device table as last read, per pool (database URL): (monotonic time, sizes).
_device_cache: dict[Any, tuple[float, _DeviceSizes]] = {}


def cached_device_sizes(session: Session | Connection, max_age: float) -> _DeviceSizes:
    """The device table, read at most once per ``max_age`` seconds per process (0: now).
    Devices register and leave rarely; ``waiting_reason`` may lag them by ``max_age``."""
    if max_age <= 0:
        return device_sizes(session)
    # One pool per process and URL (app.db.session), shared by its autocommit reader.
    bind = session.get_bind() if isinstance(session, Session) else session
    key = bind.engine.pool
    now = time.monotonic()
    cached = _device_cache.get(key)
    if cached is None or now - cached[0] > max_age:
        cached = _device_cache[key] = (now, device_sizes(session))
    return cached[1]


def _routing_key(spec: dict[str, Any]) -> str:
    """What a stored spec's waiting reason depends on: its resources and framework."""
    return json.dumps([spec.get("resources"), spec.get("framework")], sort_keys=True, default=str)


def _records(
    session: Session | Connection, rows: list[Any], device_max_age: float
) -> list[JobRecord]:
    """One read of the device table for the whole page, and only when a job on it waits; one
    waiting reason per kind of request on the page, not per queued job (a page of 50 alike
    jobs judged the fleet once)."""
    devices: _DeviceSizes | None = None
    reasons: dict[str, str | None] = {}
    records = []
    for r in rows:
        waiting = None
        if r.status == JobStatus.QUEUED.value:
            if devices is None:
                devices = cached_device_sizes(session, device_max_age)
            key = _routing_key(r.spec)
            if key not in reasons:
                reasons[key] = waiting_reason(r.spec, devices)
            waiting = reasons[key]
        records.append(_record(r, waiting))
    return records


_GET_ONE = _selecting(
    _SELECT + " WHERE j.id = :id AND (CAST(:tenant AS text) IS NULL OR j.tenant = :tenant)"
)
#: the same statement for psycopg itself (``read_job``), and its rows as ``_record`` reads them.
_GET_ONE_DRIVER = driver_sql(_GET_ONE)


def get_job(
    *, session: Session, tenant: str | None, job_id: uuid.UUID, device_max_age: float = 0
) -> JobRecord:
    """One job (``tenant`` None: any tenant's)."""
    params: dict[str, Any] = {"id": job_id, "tenant": tenant}
    rows = session.execute(_GET_ONE, params).all()
    if not rows:
        raise JobNotFound(f"job {job_id} not found")
    return _records(session, list(rows), device_max_age)[0]


def read_job(
    *, connection: Connection, tenant: str | None, job_id: uuid.UUID, device_max_age: float = 0
) -> JobRecord:
    """``get_job``'s record, its statement sent through psycopg's cursor (``app.db.driver``):
    the API's ``GET /v1/jobs/{id}``."""
    rows = fetch_all(connection, _GET_ONE_DRIVER, {"id": job_id, "tenant": tenant})
    if not rows:
        raise JobNotFound(f"job {job_id} not found")
    return _records(connection, [_JobRow._make(rows[0])], device_max_age)[0]


def job_view(*, session: Session, tenant: str, job_id: uuid.UUID) -> dict[str, Any]:
    """The job as a plain dict (tests and tools); the API's public shape is built from
    ``get_job``'s record in ``app.api.schemas``."""
    return asdict(get_job(session=session, tenant=tenant, job_id=job_id))


#: a job list cursor: the last job's (created_at, id).
_Cursor = tuple[datetime, uuid.UUID]


@functools.cache
def _list_statement(where: tuple[str, ...]) -> TextualSelect:
    """One statement per page shape (a handful), parsed once."""
    sql = _SELECT + " WHERE " + " AND ".join(where)
    return _selecting(sql + " ORDER BY j.created_at DESC, j.id DESC LIMIT :limit")


def _page_where(
    tenant: str | None, status: JobStatus | None, limit: int, cursor: _Cursor | None
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A page's conditions and parameters. Only the conditions that apply, so the planner
    picks the index of that page's shape."""
    where = ["TRUE"] if tenant is None else ["j.tenant = :tenant"]
    params: dict[str, Any] = {"tenant": tenant, "limit": limit + 1}
    if status is not None:
        where.append("j.status = CAST(:status AS job_status)")
        params["status"] = status.value
    if cursor is not None:
        where.append("(j.created_at, j.id) < (:at, :last_id)")
        params["at"], params["last_id"] = cursor
    return tuple(where), params


def _page(
    session: Session | Connection, rows: list[Any], limit: int, device_max_age: float
) -> tuple[list[JobRecord], _Cursor | None]:
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (rows[-1].created_at, rows[-1].id) if more and rows else None
    return _records(session, rows, device_max_age), next_cursor


def list_jobs(
    *,
    session: Session,
    tenant: str | None,
    status: JobStatus | None,
    limit: int,
    cursor: _Cursor | None,
    device_max_age: float = 0,
) -> tuple[list[JobRecord], _Cursor | None]:
    """Newest first; the cursor is the (created_at, id) of the last job of the previous page.
    ``tenant`` None: every tenant's jobs (an admin)."""
    where, params = _page_where(tenant, status, limit, cursor)
    rows = list(session.execute(_list_statement(where), params).all())
    return _page(session, rows, limit, device_max_age)


@functools.cache
def _list_driver_sql(where: tuple[str, ...]) -> str:
    return driver_sql(_list_statement(where))


def read_jobs(
    *,
    connection: Connection,
    tenant: str | None,
    status: JobStatus | None,
    limit: int,
    cursor: _Cursor | None,
    device_max_age: float = 0,
) -> tuple[list[JobRecord], _Cursor | None]:
    """``list_jobs``'s page, its statement sent through psycopg's cursor (``app.db.driver``):
    the API's ``GET /v1/jobs``."""
    where, params = _page_where(tenant, status, limit, cursor)
    rows = fetch_all(connection, _list_driver_sql(where), params)
    return _page(connection, [_JobRow._make(r) for r in rows], limit, device_max_age)


def job_status(*, session: Session, job_id: uuid.UUID) -> JobStatus | None:
    status: JobStatus | None = session.scalar(select(Job.status).where(Job.id == job_id))
    return status


@dataclass(frozen=True)
class JobCursor:
    """Where a job's streams stand: its last event and log sequence numbers, and its status."""

    event_seq: int
    log_seq: int
    status: JobStatus


_CHANGED_CURSORS = text(
    """
    SELECT j.id, j.event_seq, j.log_seq, j.status
      FROM unnest(CAST(:ids AS uuid[]), CAST(:events AS bigint[]), CAST(:logs AS bigint[]),
                  CAST(:statuses AS text[])) AS k(id, event_seq, log_seq, status)
      JOIN jobs j ON j.id = k.id
     WHERE k.event_seq IS NULL OR j.event_seq <> k.event_seq OR j.log_seq <> k.log_seq
           OR CAST(j.status AS text) <> k.status
    """
)


def _array_literal(values: list[Any]) -> str:
    """A Postgres array literal of uuids, integers or enum words (nothing to quote), to be
    cast by the statement: for hundreds of values, psycopg's list dumper costs the poller
    more than the query does."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def job_cursors(
    *, session: Session, known: dict[uuid.UUID, JobCursor | None]
) -> dict[uuid.UUID, JobCursor]:
    """The jobs of ``known`` whose cursor is not the one given (None: not read yet), in one
    statement for every followed job of a replica (the stream poller). The ids go as one
    array, so the statement's text is the same whatever their number, and only the jobs that
    moved come back: an idle tick costs a few rows' work, not hundreds."""
    ids = list(known)
    cursors = [known[j] for j in ids]
    rows = session.execute(
        _CHANGED_CURSORS,
        {
            "ids": _array_literal(ids),
            "events": _array_literal([None if c is None else c.event_seq for c in cursors]),
            "logs": _array_literal([None if c is None else c.log_seq for c in cursors]),
            "statuses": _array_literal([None if c is None else c.status.value for c in cursors]),
        },
    ).all()
    return {
        r.id: JobCursor(event_seq=r.event_seq, log_seq=r.log_seq, status=JobStatus(r.status))
        for r in rows
    }


def tenant_counts(*, session: Session, tenant: str) -> tuple[dict[str, int], dict[str, int]]:
    """One tenant's jobs by status, and its queued jobs per queue (from the fleet counters)."""
    counts = counters.job_counts(session=session, tenant=tenant)
    return counters.by_status(counts), counters.queued_by_queue(counts)


def tenant_job_ids(*, session: Session, tenant: str, job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``job_ids`` are the tenant's."""
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.tenant == tenant)))
