"""The worker's side of a job: win a lease, then write only while the lease's epoch is current.

Every function here is one conditional statement (plus its event row in the same transaction).
Winning the lease, for one, bumps the job's epoch and inserts the lease row in one statement.
A fenced write returns a falsy value when the lease is gone — the job was reaped, cancelled
and finished, or taken by someone else — and the caller must stop the job at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app.db.devices import DEVICE_MAY_START
from app.db.events import add_event
from app.domain.states import ErrorKind, EventKind, JobStatus, LeaseOutcome

#: hand-backs of one job that do not count as attempts; the next ones do.
FREE_HANDBACKS = 10

#: The WHERE clause every fenced write shares: the job still runs under this epoch.
FENCE = "j.id = :job_id AND j.epoch = :epoch AND j.status = 'running'"


@dataclass(frozen=True)
class LeaseGrant:
    job_id: uuid.UUID
    epoch: int
    attempt: int
    max_attempts: int
    spec: dict[str, Any]
    micro_batch: int | None
    #: recorded checkpoint paths, newest first.
    checkpoints: list[str] = field(default_factory=list)
    #: a gang's devices (``app.db.gangs``), in index order; empty for a single-GPU lease.
    gang: tuple[str, ...] = ()


#: the device row's claim is the leasing worker's, and alive.
_LIVE = "(devices.worker = :worker AND devices.expires_at > now())"


def acquire_lease(
    *, session: Session, job_id: uuid.UUID, worker: str, device_uuid: str | None, ttl: float
) -> LeaseGrant | None:
    """Win the job if it is queued and due. None means someone else has it (or it ended), or
    it asks for several GPUs (``app.db.gangs.acquire_gang`` wins those).

    The device's row is locked and marked (``current_job``) in the same statement, its claim
    renewed when this worker holds it (the first of the lease's device renewals, see
    ``heartbeat``), and a device that a gang holds, or that is reserved for a waiting gang, is
    refused: a gang's lease (``app.db.gangs``) locks the same rows, so the two never both take
    one device."""
    row = session.execute(
        text(
            f"""
            WITH dev AS (
                SELECT gang_job, reserved_for, reserved_until FROM devices
                 WHERE uuid = CAST(:device AS text) FOR UPDATE),
            won AS (
                UPDATE jobs SET status = 'running', epoch = epoch + 1,
                       attempts = attempts + 1, started_at = coalesce(started_at, now()),
                       retry_at = NULL, dispatched_at = NULL
                 WHERE id = :job_id AND status = 'queued' AND NOT cancel_requested
                   AND (retry_at IS NULL OR retry_at <= now())
                   AND {DEVICE_MAY_START}
                   AND NOT EXISTS (
                       SELECT 1 FROM dev
                        WHERE gang_job IS NOT NULL
                           -- kept idle for a waiting gang (app.db.gangs.reserve)
                           OR (reserved_for <> :job_id AND reserved_until > now()))
                   -- a job of several GPUs is won as a gang (app.db.gangs), never alone
                   AND coalesce((spec->'resources'->>'gpu_count')::int, 1) = 1
                RETURNING id, epoch, attempts, max_attempts, spec, micro_batch),
            mark AS (
                -- busy, and the worker's live claim renewed: its keeper need not (handoff)
                UPDATE devices SET current_job = won.id,
                       heartbeat_at = CASE WHEN {_LIVE} THEN now() ELSE heartbeat_at END,
                       expires_at = CASE WHEN {_LIVE} THEN now() + make_interval(secs => :ttl)
                                         ELSE expires_at END
                  FROM won
                 WHERE devices.uuid = CAST(:device AS text))
            INSERT INTO leases (job_id, epoch, worker, device_uuid, acquired_at, heartbeat_at,
                                expires_at)
            SELECT id, epoch, :worker, :device, now(), now(),
                   now() + make_interval(secs => :ttl)
              FROM won
            RETURNING epoch,
                      (SELECT attempts FROM won) AS attempts,
                      (SELECT max_attempts FROM won) AS max_attempts,
                      (SELECT spec FROM won) AS spec,
                      (SELECT micro_batch FROM won) AS micro_batch
            """
        ),
        {"job_id": job_id, "worker": worker, "device": device_uuid, "ttl": ttl},
    ).one_or_none()
    if row is None:
        return None
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.LEASED,
        epoch=row.epoch,
        message=f"attempt {row.attempts} on {worker}",
        data={"worker": worker, "device": device_uuid, "attempt": row.attempts},
    )
    return LeaseGrant(
        job_id=job_id,
        epoch=row.epoch,
        attempt=row.attempts,
        max_attempts=row.max_attempts,
        spec=row.spec,
        micro_batch=row.micro_batch,
        checkpoints=checkpoint_paths(session=session, job_id=job_id),
    )


def checkpoint_paths(*, session: Session, job_id: uuid.UUID) -> list[str]:
    """Recorded checkpoints of a job, newest first (the order a resume tries them in)."""
    paths = session.scalars(
        text("SELECT path FROM checkpoints WHERE job_id = :job_id ORDER BY step DESC, id DESC"),
        {"job_id": job_id},
    ).all()
    return list(paths)


@dataclass(frozen=True)
class Beat:
    """What a renewed lease tells its holder."""

    cancel_requested: bool
    #: False once the lease's device is no longer claimed by the lease's worker (the claim
    #: expired or another worker took the GPU), or, for a gang, once any member's worker went
    #: silent: the job must leave its devices at once (the whole gang is fenced).
    device_held: bool
    #: True when this heartbeat also renewed the claim on the lease's device (and stored the
    #: sample): the worker's keeper need not renew it itself (``workers.handoff``).
    device_renewed: bool = False


def heartbeat(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    ttl: float,
    progress: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
) -> Beat | None:
    """Extend the lease, storing the trainer's latest ``progress`` on it (None keeps the last
    one), and, in the same statement, renew the claim on the lease's device while its worker
    holds it, storing the latest GPU ``sample`` there and folding it into the job's statistics:
    one write per running job per heartbeat. None if the lease is gone."""
    row = session.execute(
        text(
            f"""
            WITH l AS (
                UPDATE leases l
                   SET heartbeat_at = now(), expires_at = now() + make_interval(secs => :ttl),
                       progress = coalesce(:progress, l.progress)
                  FROM jobs j
                 WHERE l.job_id = :job_id AND l.epoch = :epoch AND l.released_at IS NULL
                   AND {FENCE}
                RETURNING l.job_id, l.epoch, l.worker, l.device_uuid, j.cancel_requested),
            d AS (
                UPDATE devices d
                   SET heartbeat_at = now(), expires_at = now() + make_interval(secs => :ttl),
                       last_sample = coalesce(:sample, d.last_sample),
                       sampled_at = CASE WHEN :sample IS NULL THEN d.sampled_at ELSE now() END
                  FROM l
                 WHERE d.uuid = l.device_uuid AND d.worker = l.worker AND d.expires_at > now()
                RETURNING d.uuid),
            s AS (
                UPDATE jobs SET gpu_util_sum = gpu_util_sum + :util,
                       gpu_util_samples = gpu_util_samples + 1,
                       gpu_peak_memory_bytes = greatest(gpu_peak_memory_bytes, :mem)
                  FROM l
                 WHERE jobs.id = l.job_id AND :sample IS NOT NULL AND EXISTS (SELECT 1 FROM d))
            SELECT l.cancel_requested,
                   EXISTS (SELECT 1 FROM d) AS device_renewed,
                   (l.device_uuid IS NULL OR EXISTS (SELECT 1 FROM d))
                   -- a gang: every member's worker must still be alive
                   AND NOT EXISTS (
                       SELECT 1 FROM devices g
                        WHERE g.gang_job = l.job_id AND g.gang_epoch = l.epoch
                          AND (g.worker IS NULL OR g.expires_at <= now())) AS device_held
              FROM l
            """
        ).bindparams(
            bindparam("progress", type_=JSONB(none_as_null=True)),
            bindparam("sample", type_=JSONB(none_as_null=True)),
        ),
        {
            "job_id": job_id,
            "epoch": epoch,
            "ttl": ttl,
            "progress": progress,
            "sample": sample,
            "util": float((sample or {}).get("utilization") or 0.0),
            "mem": int((sample or {}).get("memory_used_bytes") or 0),
        },
    ).one_or_none()
    if row is None:
        return None
    return Beat(
        cancel_requested=row.cancel_requested,
        device_held=row.device_held,
        device_renewed=row.device_renewed,
    )


def record_progress(
    *, session: Session, job_id: uuid.UUID, epoch: int, progress: dict[str, Any]
) -> bool:
    """Store progress on the live lease (a narrow row; the jobs row carries the spec). The
    supervisor sends it with the heartbeat instead; this writes it on its own (the last one,
    at the run's end)."""
    stmt = text(
        f"""
        UPDATE leases l SET progress = :progress FROM jobs j
         WHERE l.job_id = :job_id AND l.epoch = :epoch AND l.released_at IS NULL AND {FENCE}
        RETURNING l.id
        """
    ).bindparams(bindparam("progress", type_=JSONB))
    params = {"job_id": job_id, "epoch": epoch, "progress": progress}
    return session.scalar(stmt, params) is not None


@dataclass(frozen=True)
class StaleCheckpoint:
    """A checkpoint record beyond the last N, deleted: its file (and object) go next."""

    path: str
    storage_key: str | None


def record_checkpoint(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    step: int,
    path: str,
    keep: int,
    sha256: str | None = None,
    size: int | None = None,
    storage_key: str | None = None,
) -> list[StaleCheckpoint] | None:
    """Record a checkpoint the trainer wrote (and, with ``storage_key``, that is in the store).
    Returns the checkpoints now beyond the last ``keep`` (for the caller to delete), or None if
    the lease is gone (the file must not be used)."""
    inserted = session.scalar(
        text(
            f"""
            INSERT INTO checkpoints (job_id, epoch, step, path, saved_at, sha256, size,
                                     storage_key)
            SELECT :job_id, :epoch, :step, :path, now(), :sha256, :size, :key
              FROM jobs j WHERE {FENCE}
            RETURNING id
            """
        ),
        {
            "job_id": job_id,
            "epoch": epoch,
            "step": step,
            "path": path,
            "sha256": sha256,
            "size": size,
            "key": storage_key,
        },
    )
    if inserted is None:
        return None
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.CHECKPOINT,
        epoch=epoch,
        message=f"step {step}",
        data={"step": step, "path": path},
    )
    stale = session.execute(
        text(
            """
            DELETE FROM checkpoints WHERE job_id = :job_id AND id NOT IN (
                SELECT id FROM checkpoints WHERE job_id = :job_id
                 ORDER BY step DESC, id DESC LIMIT :keep)
            RETURNING path, storage_key
            """
        ),
        {"job_id": job_id, "keep": keep},
    ).all()
    # A step saved again after an OOM restart in the same lease has the same path twice.
    kept = set(checkpoint_paths(session=session, job_id=job_id))
    unique = {row.path: StaleCheckpoint(row.path, row.storage_key) for row in stale}
    return [old for path, old in unique.items() if path not in kept]


def record_micro_batch(
    *, session: Session, job_id: uuid.UUID, epoch: int, old: int, new: int, batch_size: int
) -> bool:
    """Store the halved micro-batch after an out-of-memory error (OOM backoff)."""
    done = session.scalar(
        text(f"UPDATE jobs j SET micro_batch = :new WHERE {FENCE} RETURNING j.id"),
        {"job_id": job_id, "epoch": epoch, "new": new},
    )
    if done is None:
        return False
    accumulation = -(-batch_size // new)
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.OOM_BACKOFF,
        epoch=epoch,
        message=f"out of memory at micro-batch {old}: retrying with {new} x {accumulation}",
        data={"from": old, "micro_batch": new, "accumulation": accumulation},
    )
    return True


def record_gpu_peak(*, session: Session, job_id: uuid.UUID, epoch: int, peak_bytes: int) -> bool:
    done = session.scalar(
        text(
            f"""
            UPDATE jobs j SET gpu_peak_memory_bytes = greatest(j.gpu_peak_memory_bytes, :peak)
             WHERE {FENCE} RETURNING j.id
            """
        ),
        {"job_id": job_id, "epoch": epoch, "peak": peak_bytes},
    )
    return done is not None


def add_fenced_event(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    kind: EventKind,
    message: str,
    data: dict[str, Any] | None = None,
) -> bool:
    """An event from the lease holder, written only while it still holds the lease."""
    stmt = text(
        f"""
        INSERT INTO job_events (job_id, kind, epoch, message, data)
        SELECT j.id, :kind, :epoch, :message, :data FROM jobs j WHERE {FENCE}
        RETURNING id
        """
    ).bindparams(bindparam("data", type_=JSONB))
    params = {"job_id": job_id, "epoch": epoch, "kind": kind.value, "message": message}
    return session.scalar(stmt, {**params, "data": data}) is not None


_OUTCOME_EVENT = {
    LeaseOutcome.SUCCEEDED: EventKind.SUCCEEDED,
    LeaseOutcome.FAILED: EventKind.FAILED,
    LeaseOutcome.CANCELLED: EventKind.CANCELLED,
}
_OUTCOME_STATUS = {
    LeaseOutcome.SUCCEEDED: JobStatus.SUCCEEDED,
    LeaseOutcome.FAILED: JobStatus.FAILED,
    LeaseOutcome.CANCELLED: JobStatus.CANCELLED,
}


#: The CTE the end statements share: the job's device is idle again (no write of its own).
_IDLE = "UPDATE devices SET current_job = NULL WHERE current_job IN (SELECT id FROM j)"


def finish(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    outcome: LeaseOutcome,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """End the job for good (succeeded, failed or cancelled), close its lease and mark its
    device idle."""
    status = _OUTCOME_STATUS[outcome]
    stmt = text(
        f"""
        WITH j AS (
            UPDATE jobs j SET status = CAST(:status AS job_status), finished_at = now(),
                   result = :result, error = :error, retry_at = NULL
             WHERE {FENCE}
            RETURNING j.id),
        idle AS ({_IDLE})
        UPDATE leases SET released_at = now(), outcome = CAST(:outcome AS lease_outcome)
         WHERE job_id IN (SELECT id FROM j) AND epoch = :epoch AND released_at IS NULL
        RETURNING id
        """
    ).bindparams(bindparam("result", type_=JSONB), bindparam("error", type_=JSONB))
    closed = session.scalar(
        stmt,
        {
            "job_id": job_id,
            "epoch": epoch,
            "status": status.value,
            "outcome": outcome.value,
            "result": result,
            "error": error,
        },
    )
    if closed is None:
        return False
    message = "" if error is None else f"{error.get('kind')}: {error.get('message')}"
    add_event(
        session=session,
        job_id=job_id,
        kind=_OUTCOME_EVENT[outcome],
        epoch=epoch,
        message=message,
        data=result if error is None else error,
    )
    return True


def requeue_for_retry(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    kind: ErrorKind,
    message: str,
    backoff_s: float,
    count_attempt: bool = True,
) -> JobStatus | None:
    """Give the job back: queued with ``retry_at``, or failed when its attempts are spent, or
    cancelled when a cancel arrived meanwhile (a queued job must never carry a pending cancel:
    nothing would lease or cancel it). With ``count_attempt=False`` (the worker is draining, or
    lost the database) the try is handed back without counting against ``max_attempts``, up to
    ``FREE_HANDBACKS`` times per job; past that a hand-back counts, so a job whose workers keep
    being stopped still ends. Its device is marked idle. None if the lease was gone."""
    error: dict[str, Any] = {"kind": kind.value, "message": message}
    cancelled: dict[str, Any] = {
        "kind": ErrorKind.CANCELLED.value,
        "message": "cancelled by request",
    }
    stmt = text(
        f"""
        WITH d AS (
            SELECT j.id, c.counted, CASE
                       WHEN j.cancel_requested THEN 'cancelled'
                       WHEN c.counted AND j.attempts >= j.max_attempts THEN 'failed'
                       ELSE 'queued' END AS status
              FROM jobs j CROSS JOIN LATERAL (
                   -- past the cap a hand-back counts. Every lease row is one acquire and each
                   -- free hand-back gave its attempt back: the difference is the free ones.
                   SELECT :count OR (SELECT count(*) FROM leases WHERE job_id = j.id)
                                    - j.attempts >= :cap AS counted) c
             WHERE {FENCE} FOR UPDATE OF j),
        j AS (
            UPDATE jobs j SET
                   attempts = j.attempts - CASE WHEN d.counted THEN 0 ELSE 1 END,
                   status = d.status::job_status,
                   finished_at = CASE WHEN d.status <> 'queued' THEN now() END,
                   retry_at = CASE WHEN d.status = 'queued'
                                   THEN now() + make_interval(secs => :backoff) END,
                   dispatched_at = NULL,
                   error = CASE WHEN d.status = 'cancelled' THEN :cancelled ELSE :error END
              FROM d WHERE j.id = d.id
            RETURNING j.id, d.status, d.counted),
        l AS (
            UPDATE leases SET released_at = now(),
                   outcome = CASE (SELECT status FROM j)
                       WHEN 'failed' THEN 'failed'::lease_outcome
                       WHEN 'cancelled' THEN 'cancelled'::lease_outcome
                       ELSE 'requeued'::lease_outcome END
             WHERE job_id IN (SELECT id FROM j) AND epoch = :epoch AND released_at IS NULL),
        idle AS ({_IDLE})
        SELECT status, counted FROM j
        """
    ).bindparams(bindparam("error", type_=JSONB), bindparam("cancelled", type_=JSONB))
    params = {
        "job_id": job_id,
        "epoch": epoch,
        "backoff": backoff_s,
        "error": error,
        "cancelled": cancelled,
        "count": count_attempt,
        "cap": FREE_HANDBACKS,
    }
    row = session.execute(stmt, params).one_or_none()
    if row is None:
        return None
    new_status = JobStatus(row.status)
    if new_status == JobStatus.CANCELLED:
        event, text_, data = (
            EventKind.CANCELLED,
            f"cancelled by request (stopped: {message})",
            cancelled,
        )
    elif new_status == JobStatus.FAILED:
        event, text_, data = EventKind.FAILED, f"{kind.value}: {message} (attempts spent)", error
    elif not row.counted:
        event, text_, data = EventKind.HANDED_BACK, f"{message}; not counted as an attempt", error
    elif not count_attempt:
        event = EventKind.HANDED_BACK
        text_ = f"{message}; counted as an attempt: over {FREE_HANDBACKS} free hand-backs"
        data = error
    else:
        event = EventKind.RETRY
        text_ = f"{kind.value}: {message}; retry in {backoff_s:.1f}s"
        data = {**error, "backoff_s": round(backoff_s, 3)}
    add_event(session=session, job_id=job_id, kind=event, epoch=epoch, message=text_, data=data)
    return new_status
