"""The one object through which a supervisor writes anything for its lease.

Every write names the lease's epoch and is refused once the lease is gone: progress,
checkpoints, events, the trainer's output, the heartbeat, and the run's end. A refused write
raises :class:`LeaseLost` (the supervisor stops the job at once). Two kinds of write differ in
what an unreachable database means:

- relays (checkpoints, events, output) are dropped with a warning: the heartbeat, not a
  relay, decides when an unreachable database means giving up; progress is not written on its
  own but with the next heartbeat (and before the run's end);
- ends (finish, requeue, OOM backoff) are retried while the lease could still be ours, since
  giving up leaves the job to the reaper and spends an attempt.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.db import artifacts as artifact_rows
from app.db import checkpoints as checkpoint_rows
from app.db import leases
from app.db.logs import append_log
from app.db.session import session_scope
from app.domain.states import ErrorKind, EventKind, JobStatus, LeaseOutcome
from workers.handoff import Handoff

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeaseLost(Exception):
    """The lease is gone: another worker or the reaper owns this job now."""


class LeaseWriter:
    def __init__(
        self,
        database_url: str,
        job_id: uuid.UUID,
        epoch: int,
        *,
        ttl: float,
        handoff: Handoff | None = None,
    ) -> None:
        self.database_url = database_url
        self.job_id = job_id
        self.epoch = epoch
        self.ttl = ttl
        #: shared with the worker's main process: the heartbeat carries the latest GPU sample
        #: and renews the device claim, so the keeper and the telemetry thread write nothing.
        self.handoff = handoff
        #: samples taken before the lease was won belong to no job.
        self._since = time.time()
        if handoff is not None:  # the lease statement renewed the device claim
            handoff.mark_leased()
        #: the trainer's latest progress not yet stored: it goes with the next heartbeat.
        self._progress: dict[str, Any] | None = None

    @property
    def tag(self) -> str:
        return f"job {self.job_id} epoch {self.epoch}"

    def _db(self, fn: Callable[[Session], T]) -> T:
        with session_scope(self.database_url) as session:
            return fn(session)

    def _relay(self, write: Callable[[Session], T], *, what: str) -> T | None:
        """A fenced write that may be dropped while the database is unreachable."""
        try:
            result = self._db(write)
        except SQLAlchemyError as exc:
            log.warning("%s: could not record %s: %s", self.tag, what, exc)
            return None
        if result is None or result is False:
            raise LeaseLost(f"{what} write refused")
        return result

    def _durable(self, write: Callable[[Session], T], *, budget: float) -> T:
        """A fenced write retried while the database is unreachable, for ``budget`` seconds."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OperationalError),
            stop=tenacity.stop_after_delay(max(budget, 0.0)),
            wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=lambda state: log.warning(
                "%s: database unreachable (%s); retrying",
                self.tag,
                state.outcome and state.outcome.exception(),
            ),
            reraise=True,
        )
        result: T = retrying(self._db, write)
        return result

    # -- while the trainer runs ------------------------------------------------------------

    def heartbeat(self) -> leases.Beat:
        """Renew the lease, storing the latest progress with it, and the device claim with the
        latest GPU sample: one write per running job per heartbeat. Raises LeaseLost when
        refused; a database error propagates."""
        progress = self._progress
        handoff = self.handoff
        sample = handoff.take_sample(since=self._since) if handoff is not None else None
        beat = self._db(
            lambda s: leases.heartbeat(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                ttl=self.ttl,
                progress=progress,
                sample=sample,
            )
        )
        if beat is None:
            raise LeaseLost("heartbeat refused")
        if self._progress is progress:
            self._progress = None
        if beat.device_renewed and self.handoff is not None:
            self.handoff.mark_renewed()
        return beat

    def progress(self, progress: dict[str, Any]) -> None:
        """Keep the trainer's progress for the next heartbeat: the API shows it at most one
        heartbeat interval old, and a running job costs one write per interval."""
        self._progress = progress

    def flush_progress(self) -> None:
        """Store the progress still pending (the run's last), before its end is recorded."""
        progress = self._progress
        if progress is None:
            return
        self._progress = None
        with contextlib.suppress(LeaseLost):  # the end's own write says so
            self._relay(
                lambda s: leases.record_progress(
                    session=s, job_id=self.job_id, epoch=self.epoch, progress=progress
                ),
                what="progress",
            )

    def checkpoint(
        self,
        *,
        step: int,
        path: str,
        keep: int,
        sha256: str | None = None,
        size: int | None = None,
        storage_key: str | None = None,
    ) -> list[leases.StaleCheckpoint]:
        """Record a checkpoint; returns those now beyond the last ``keep``."""
        stale = self._relay(
            lambda s: leases.record_checkpoint(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                step=step,
                path=path,
                keep=keep,
                sha256=sha256,
                size=size,
                storage_key=storage_key,
            ),
            what="checkpoint",
        )
        return stale or []

    def artifacts(self, stored: list[artifact_rows.StoredArtifact], *, budget: float) -> bool:
        """Record the uploaded artifacts before the job's success. False if the lease is gone."""
        return self._durable(
            lambda s: artifact_rows.record(
                session=s, job_id=self.job_id, epoch=self.epoch, artifacts=stored
            ),
            budget=budget,
        )

    def event(self, kind: EventKind, message: str, data: dict[str, Any]) -> None:
        self._relay(
            lambda s: leases.add_fenced_event(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                kind=kind,
                message=message,
                data=data,
            ),
            what=kind.value,
        )

    def gpu_peak(self, peak_bytes: int) -> None:
        self._relay(
            lambda s: leases.record_gpu_peak(
                session=s, job_id=self.job_id, epoch=self.epoch, peak_bytes=peak_bytes
            ),
            what="gpu memory",
        )

    def output(self, chunk: str) -> None:
        """Store a chunk of the trainer's output; a zombie's output is refused like any write."""
        self._relay(
            lambda s: append_log(session=s, job_id=self.job_id, epoch=self.epoch, chunk=chunk),
            what=f"{len(chunk)} characters of output",
        )

    def checkpoints(self) -> list[str]:
        return self._db(lambda s: leases.checkpoint_paths(session=s, job_id=self.job_id))

    def recorded_checkpoints(self) -> list[checkpoint_rows.RecordedCheckpoint]:
        return self._db(lambda s: checkpoint_rows.recorded(session=s, job_id=self.job_id))

    # -- the end of a run ------------------------------------------------------------------

    def shrink(self, *, old: int, new: int, batch_size: int, budget: float) -> bool:
        """Store a halved micro-batch (OOM backoff). False if the lease is gone."""
        return self._durable(
            lambda s: leases.record_micro_batch(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                old=old,
                new=new,
                batch_size=batch_size,
            ),
            budget=budget,
        )

    def finish(
        self,
        outcome: LeaseOutcome,
        *,
        budget: float,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """End the job for good. False if the lease is gone."""
        self.flush_progress()
        return self._durable(
            lambda s: leases.finish(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                outcome=outcome,
                result=result,
                error=error,
            ),
            budget=budget,
        )

    def requeue(
        self, *, message: str, backoff_s: float, counted: bool, budget: float
    ) -> JobStatus | None:
        """Give the job back (see ``leases.requeue_for_retry``). None if the lease is gone."""
        self.flush_progress()
        return self._durable(
            lambda s: leases.requeue_for_retry(
                session=s,
                job_id=self.job_id,
                epoch=self.epoch,
                kind=ErrorKind.INFRA,
                message=message,
                backoff_s=backoff_s,
                count_attempt=counted,
            ),
            budget=budget,
        )
