"""The lease lifecycle around a trainer process: heartbeat, cancel, fencing, OOM backoff, retry.

The supervisor runs in the Celery task process. It wins the lease, starts the trainer in a
fresh interpreter (``subprocess``: CUDA starts clean, and prefork children may not have
``multiprocessing`` children), relays the trainer's messages to Postgres under the lease's
epoch, renews the lease, and stops the trainer when the job is cancelled or the lease is lost.
If it cannot renew for ``lease_ttl - 2 * heartbeat_interval`` it kills the trainer itself: the
trainer must be gone before anyone else may take the lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, TypeVar

import tenacity
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.db import devices as device_rows
from app.db import leases
from app.db.logs import append_log
from app.db.session import session_scope
from app.domain.retry import accumulation_for, infra_backoff, next_micro_batch
from app.domain.spec import JobSpec
from app.domain.states import ErrorKind, EventKind, JobStatus, LeaseOutcome
from app.settings import Settings
from workers import drain
from workers.trainers import protocol
from workers.trainers.protocol import Launch
from workers.watchdog import Deadline

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds a trainer gets to checkpoint and exit after being asked to stop, then after SIGTERM.
STOP_GRACE_S = 10.0
TERM_GRACE_S = 5.0
#: flush the trainer's output to Postgres at least this often, or at this size.
LOG_FLUSH_S = 1.0
LOG_FLUSH_BYTES = 64 * 1024


class Outcome(StrEnum):
    SKIPPED = "skipped"  #: someone else holds the job (duplicate delivery): not an error
    SUCCEEDED = "succeeded"  #: the job finished with a result
    FAILED = "failed"  #: the job failed for good
    CANCELLED = "cancelled"  #: the job was cancelled
    REQUEUED = "requeued"  #: handed back for a retry with backoff
    LEASE_LOST = "lease_lost"  #: the lease was taken away; this worker stopped writing


@dataclass(frozen=True)
class WorkerIdentity:
    worker: str
    device_uuid: str | None
    cuda: bool  #: a real GPU (False: simulated device, the trainer runs on the CPU)


@dataclass
class TrainerRun:
    """What one trainer process did, as the supervisor saw it."""

    exit_code: int | None = None
    result: protocol.Result | None = None
    failure: protocol.Failure | None = None
    lease_lost: bool = False
    #: the worker's claim on its GPU ended while the trainer ran (see ``leases.Beat``).
    device_lost: bool = False
    #: the worker is shutting down and asked the trainer to stop (see ``workers.drain``).
    drained: bool = False
    cancelled: bool = False
    #: the messages the trainer sent, in order (tests and events read these).
    messages: list[Any] = field(default_factory=list)


class LeaseLost(Exception):
    """The lease is gone: another worker or the reaper owns this job now."""


class DeviceLost(Exception):
    """The lease holds, but this worker's claim on its GPU ended: another worker may start a
    job on that GPU, so this one must leave it now and hand the job back."""


def _die_with_parent() -> None:
    """preexec: the trainer gets SIGKILL when its supervisor dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)


class Supervisor:
    def __init__(self, settings: Settings, identity: WorkerIdentity) -> None:
        self.settings = settings
        self.identity = identity

    # -- database access -------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with session_scope(self.settings.database_url) as session:
            yield session

    def _db(self, fn: Callable[[Session], T]) -> T:
        with self._session() as session:
            return fn(session)

    def _db_durable(self, fn: Callable[[Session], T]) -> T:
        """A write that ends a trainer run (finish, retry, OOM backoff), retried while the
        database is unreachable, for as long as the lease would survive without a heartbeat.
        Giving up leaves the lease to expire and the reaper to requeue the job."""
        budget = self.settings.lease_ttl - 2 * self.settings.heartbeat_interval
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OperationalError),
            stop=tenacity.stop_after_delay(max(budget, 0.0)),
            wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=lambda state: log.warning(
                "database unreachable (%s); retrying", state.outcome and state.outcome.exception()
            ),
            reraise=True,
        )
        result: T = retrying(self._db, fn)
        return result

    # -- the job ---------------------------------------------------------------------------

    def run(self, job_id: uuid.UUID) -> Outcome:
        grant = self._db(
            lambda s: leases.acquire_lease(
                session=s,
                job_id=job_id,
                worker=self.identity.worker,
                device_uuid=self.identity.device_uuid,
                ttl=self.settings.lease_ttl,
            )
        )
        if grant is None:
            log.info("job %s: not leased (already taken, finished or not due); ack", job_id)
            return Outcome.SKIPPED
        log.info("job %s epoch %s: leased (attempt %s)", job_id, grant.epoch, grant.attempt)
        self._set_device_job(job_id)
        try:
            outcome = self._run_lease(grant)
        finally:
            self._set_device_job(None)
        log.info("job %s epoch %s: %s", job_id, grant.epoch, outcome.value)
        return outcome

    def _set_device_job(self, job_id: uuid.UUID | None) -> None:
        device = self.identity.device_uuid
        if device is None:
            return
        try:
            self._db(
                lambda s: device_rows.set_current_job(
                    session=s, uuid=device, worker=self.identity.worker, job_id=job_id
                )
            )
        except SQLAlchemyError as exc:  # telemetry only; the lease is what matters
            log.warning("could not mark device %s busy/idle: %s", device, exc)

    def _run_lease(self, grant: leases.LeaseGrant) -> Outcome:
        job_id, epoch = grant.job_id, grant.epoch
        try:
            spec = JobSpec.model_validate(grant.spec)
        except ValueError as exc:
            return self._finish_failed(grant, ErrorKind.USER_ERROR, f"invalid spec: {exc}")
        batch = spec.training.batch_size
        micro = min(grant.micro_batch or batch, batch)
        checkpoints = grant.checkpoints
        while True:
            run = self._run_trainer(grant, spec, micro, checkpoints)
            if run.lease_lost:
                return Outcome.LEASE_LOST
            if run.device_lost:
                message = (
                    f"{self.identity.worker} lost its claim on device {self.identity.device_uuid}"
                    " while the job ran; handed back for another worker"
                )
                return self._hand_back(grant, spec, message, count_attempt=True)
            if run.drained:
                message = f"{self.identity.worker} is shutting down; handed back at its checkpoint"
                return self._hand_back(grant, spec, message, count_attempt=False)
            if run.cancelled:
                return self._finish(
                    grant,
                    LeaseOutcome.CANCELLED,
                    error={"kind": ErrorKind.CANCELLED.value, "message": "cancelled by request"},
                )
            code = run.exit_code
            if code == protocol.EXIT_OK and run.result is not None:
                return self._finish(
                    grant, LeaseOutcome.SUCCEEDED, result=run.result.model_dump(exclude={"type"})
                )
            message = run.failure.message if run.failure else f"trainer exited with code {code}"
            if code == protocol.EXIT_OOM:
                smaller = next_micro_batch(micro)
                if smaller is None:
                    return self._finish_failed(
                        grant, ErrorKind.OOM, f"out of memory even at micro-batch 1: {message}"
                    )
                stored = self._db_durable(
                    functools.partial(
                        _record_backoff,
                        job_id=job_id,
                        epoch=epoch,
                        old=micro,
                        new=smaller,
                        batch_size=batch,
                    )
                )
                if not stored:
                    return Outcome.LEASE_LOST
                log.warning(
                    "job %s epoch %s: OOM at micro-batch %s; retrying with %s x %s",
                    job_id,
                    epoch,
                    micro,
                    smaller,
                    accumulation_for(batch, smaller),
                )
                micro = smaller
                checkpoints = self._db(lambda s: leases.checkpoint_paths(session=s, job_id=job_id))
                continue
            if code == protocol.EXIT_USER_ERROR:
                return self._finish_failed(grant, ErrorKind.USER_ERROR, message)
            return self._requeue(grant, message)

    def _finish(
        self,
        grant: leases.LeaseGrant,
        outcome: LeaseOutcome,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Outcome:
        done = self._db_durable(
            lambda s: leases.finish(
                session=s,
                job_id=grant.job_id,
                epoch=grant.epoch,
                outcome=outcome,
                result=result,
                error=error,
            )
        )
        return Outcome(outcome.value) if done else Outcome.LEASE_LOST

    def _finish_failed(self, grant: leases.LeaseGrant, kind: ErrorKind, message: str) -> Outcome:
        return self._finish(
            grant, LeaseOutcome.FAILED, error={"kind": kind.value, "message": message}
        )

    def _requeue(
        self,
        grant: leases.LeaseGrant,
        message: str,
        *,
        backoff_s: float | None = None,
        count_attempt: bool = True,
    ) -> Outcome:
        backoff = infra_backoff(grant.attempt) if backoff_s is None else backoff_s
        status = self._db_durable(
            lambda s: leases.requeue_for_retry(
                session=s,
                job_id=grant.job_id,
                epoch=grant.epoch,
                kind=ErrorKind.INFRA,
                message=message,
                backoff_s=backoff,
                count_attempt=count_attempt,
            )
        )
        if status is None:
            return Outcome.LEASE_LOST
        if status == JobStatus.CANCELLED:
            return Outcome.CANCELLED
        return Outcome.FAILED if status.is_final else Outcome.REQUEUED

    def _hand_back(
        self, grant: leases.LeaseGrant, spec: JobSpec, message: str, *, count_attempt: bool
    ) -> Outcome:
        """Requeue a job this worker must leave, due at once, and wake another worker for it
        rather than leave its GPU idle until the reaper's next pass (which still covers a
        failed send)."""
        outcome = self._requeue(grant, message, backoff_s=0.0, count_attempt=count_attempt)
        if outcome == Outcome.REQUEUED:
            from app.queue import Dispatcher

            Dispatcher(self.settings).dispatch(
                job_id=grant.job_id, queue=spec.queue, priority=spec.priority
            )
        return outcome

    # -- one trainer process ---------------------------------------------------------------

    def _launch(
        self, grant: leases.LeaseGrant, spec: JobSpec, micro: int, checkpoints: list[str], tmp: Path
    ) -> Path:
        launch = Launch(
            job_id=str(grant.job_id),
            epoch=grant.epoch,
            attempt=grant.attempt,
            spec=spec,
            checkpoint_dir=(self.settings.checkpoint_root / str(grant.job_id)).resolve(),
            resume_from=[Path(p) for p in checkpoints],
            micro_batch=micro,
            data_root=self.settings.data_root.resolve(),
            device="cuda" if self.identity.cuda else "cpu",
            fault_injection=self.settings.fault_injection,
            entrypoint_prefixes=self.settings.entrypoint_prefixes,
        )
        launch.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = tmp / "launch.json"
        launch.dump(path)
        return path

    def _run_trainer(
        self, grant: leases.LeaseGrant, spec: JobSpec, micro: int, checkpoints: list[str]
    ) -> TrainerRun:
        with tempfile.TemporaryDirectory(prefix="gpufleet-") as tmp:
            launch = self._launch(grant, spec, micro, checkpoints, Path(tmp))
            read_fd, write_fd = os.pipe()
            env = {**os.environ, protocol.CONTROL_FD_ENV: str(write_fd), "PYTHONUNBUFFERED": "1"}
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "workers.trainers.main", str(launch)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    env=env,
                    # The task process runs no threads of its own when it forks the trainer.
                    preexec_fn=_die_with_parent,
                )
            finally:
                os.close(write_fd)
            with os.fdopen(read_fd, "rb", buffering=0) as control:
                return _Watch(self, grant, proc, control).run()


class _Watch:
    """Watches one trainer process: relays its messages and output, renews the lease."""

    def __init__(
        self,
        sup: Supervisor,
        grant: leases.LeaseGrant,
        proc: subprocess.Popen[bytes],
        control: IO[bytes],
    ) -> None:
        self.sup = sup
        self.settings = sup.settings
        self.grant = grant
        self.proc = proc
        self.control = control
        self.run_state = TrainerRun()
        self._control_buf = b""
        self._log_buf = b""
        self._log_flushed_at = time.monotonic()
        # Kills the trainer once the lease has gone lease_ttl - 2 * heartbeat_interval without
        # renewal, so that it is gone before anyone else may take the lease, even while this
        # loop is stuck in a database call that never returns (a network black hole).
        self.deadline = Deadline(
            budget=self.settings.lease_ttl - 2 * self.settings.heartbeat_interval,
            on_expire=self._lease_deadline_passed,
            name="lease-watchdog",
        )
        self._stop_asked_at: float | None = None
        self._term_sent_at: float | None = None
        self._drain_asked = False

    @property
    def tag(self) -> str:
        return f"job {self.grant.job_id} epoch {self.grant.epoch}"

    def run(self) -> TrainerRun:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        next_beat = time.monotonic() + self.settings.heartbeat_interval
        open_streams = 2
        watchdog = self.deadline
        watchdog.start()
        try:
            while open_streams:
                timeout = max(0.0, min(next_beat - time.monotonic(), 0.5))
                for key, _ in sel.select(timeout):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                    elif key.data == "control":
                        self._on_control(chunk)
                    else:
                        self._log_buf += chunk
                self._maybe_flush_log()
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + self.settings.heartbeat_interval
                if self._stop_asked_at is None and drain.requested():
                    log.warning(
                        "%s: the worker is shutting down; stopping at a checkpoint", self.tag
                    )
                    self._drain_asked = True
                    self._ask_stop()
                self._escalate_stop()
            self.run_state.exit_code = self.proc.wait()
            if watchdog.fired:
                raise LeaseLost(f"could not renew for {watchdog.budget:.1f}s")
        except LeaseLost as exc:
            log.warning("%s: lease lost (%s); killing the trainer", self.tag, exc)
            self.run_state.lease_lost = True
            self._kill()
        except DeviceLost as exc:
            log.error("%s: %s; killing the trainer", self.tag, exc)
            self.run_state.device_lost = True
            self._kill()
        finally:
            watchdog.stop()
            sel.close()
            self._flush_log()
            if self.proc.poll() is None:
                self._kill()
        finished = self.run_state.exit_code == protocol.EXIT_OK and self.run_state.result
        # A trainer that ended on its own despite the drain (done, or a bug) is recorded as such.
        self.run_state.drained = (
            self._drain_asked
            and not finished
            and self.run_state.exit_code != protocol.EXIT_USER_ERROR
        )
        interrupted = (
            self.run_state.lease_lost or self.run_state.device_lost or self.run_state.drained
        )
        if self._stop_asked_at is not None and not interrupted and not finished:
            self.run_state.cancelled = True
        return self.run_state

    # -- messages --------------------------------------------------------------------------

    def _on_control(self, chunk: bytes) -> None:
        self._control_buf += chunk
        *lines, self._control_buf = self._control_buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = protocol.decode(line)
            except ValueError as exc:
                log.warning("%s: unreadable trainer message %r: %s", self.tag, line[:200], exc)
                continue
            self.run_state.messages.append(msg)
            self._handle(msg)

    def _handle(self, msg: Any) -> None:
        job_id, epoch = self.grant.job_id, self.grant.epoch
        if isinstance(msg, protocol.Progress):
            progress = msg.model_dump(exclude={"type"})
            self._fenced(
                lambda s: leases.record_progress(
                    session=s, job_id=job_id, epoch=epoch, progress=progress
                ),
                what="progress",
            )
        elif isinstance(msg, protocol.CheckpointSaved):
            stale = self._fenced(
                lambda s: leases.record_checkpoint(
                    session=s,
                    job_id=job_id,
                    epoch=epoch,
                    step=msg.step,
                    path=msg.path,
                    keep=self.settings.checkpoints_keep,
                ),
                what="checkpoint",
            )
            for path in stale or []:
                _remove_checkpoint(Path(path))
        elif isinstance(msg, protocol.CheckpointSkipped):
            self._event(EventKind.CHECKPOINT_SKIPPED, f"{msg.path}: {msg.reason}", msg)
        elif isinstance(msg, protocol.Resumed):
            self._event(EventKind.RESUMED, f"resumed at step {msg.step} from {msg.path}", msg)
        elif isinstance(msg, protocol.GpuMemory):
            self._fenced(
                lambda s: leases.record_gpu_peak(
                    session=s, job_id=job_id, epoch=epoch, peak_bytes=msg.peak_bytes
                ),
                what="gpu memory",
            )
        elif isinstance(msg, protocol.Result):
            self.run_state.result = msg
        elif isinstance(msg, protocol.Failure):
            self.run_state.failure = msg

    def _event(self, kind: EventKind, message: str, msg: Any) -> None:
        data = msg.model_dump(exclude={"type"})
        self._fenced(
            lambda s: leases.add_fenced_event(
                session=s,
                job_id=self.grant.job_id,
                epoch=self.grant.epoch,
                kind=kind,
                message=message,
                data=data,
            ),
            what=kind.value,
        )

    def _fenced(self, write: Callable[[Session], Any], *, what: str) -> Any:
        """Run a fenced write. Refused -> LeaseLost; database down -> logged and dropped
        (the heartbeat decides when an unreachable database means giving up)."""
        try:
            result = self.sup._db(write)
        except SQLAlchemyError as exc:
            log.warning("%s: could not record %s: %s", self.tag, what, exc)
            return None
        if result is None or result is False:
            raise LeaseLost(f"{what} write refused")
        return result

    # -- lease renewal and stopping --------------------------------------------------------

    def _heartbeat(self) -> None:
        try:
            beat = self.sup._db(
                lambda s: leases.heartbeat(
                    session=s,
                    job_id=self.grant.job_id,
                    epoch=self.grant.epoch,
                    ttl=self.settings.lease_ttl,
                )
            )
        except SQLAlchemyError as exc:  # the watchdog decides when this means giving up
            silent = self.deadline.silent_for
            log.warning("%s: heartbeat failed (%.1fs without renewal): %s", self.tag, silent, exc)
            return
        if beat is None:
            raise LeaseLost("heartbeat refused")
        self.deadline.renew()
        if not beat.device_held:
            raise DeviceLost(
                f"device {self.sup.identity.device_uuid} is no longer claimed by this worker"
            )
        if beat.cancel_requested and self._stop_asked_at is None:
            log.info("%s: cancel requested; asking the trainer to stop", self.tag)
            self._ask_stop()

    def _lease_deadline_passed(self) -> None:
        log.error(
            "%s: no lease renewal for %.1fs; killing the trainer before the lease expires",
            self.tag,
            self.deadline.budget,
        )
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def _ask_stop(self) -> None:
        self._stop_asked_at = time.monotonic()
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(b"stop\n")
                stdin.flush()

    def _escalate_stop(self) -> None:
        """Ask, then SIGTERM, then SIGKILL."""
        if self._stop_asked_at is None or self.proc.poll() is not None:
            return
        now = time.monotonic()
        if self._term_sent_at is None and now - self._stop_asked_at > STOP_GRACE_S:
            self._term_sent_at = now
            self.proc.terminate()
        elif self._term_sent_at is not None and now - self._term_sent_at > TERM_GRACE_S:
            self.proc.kill()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.run_state.exit_code = self.proc.returncode

    # -- the trainer's output --------------------------------------------------------------

    def _maybe_flush_log(self) -> None:
        due = time.monotonic() - self._log_flushed_at >= LOG_FLUSH_S
        if self._log_buf and (due or len(self._log_buf) >= LOG_FLUSH_BYTES):
            self._flush_log()

    def _flush_log(self) -> None:
        if not self._log_buf:
            return
        text = self._log_buf.decode(errors="replace")
        self._log_buf = b""
        self._log_flushed_at = time.monotonic()
        try:
            self.sup._db(
                lambda s: append_log(
                    session=s, job_id=self.grant.job_id, epoch=self.grant.epoch, chunk=text
                )
            )
        except SQLAlchemyError as exc:
            log.warning("%s: could not store %d bytes of output: %s", self.tag, len(text), exc)


def _record_backoff(
    session: Session, *, job_id: uuid.UUID, epoch: int, old: int, new: int, batch_size: int
) -> bool:
    return leases.record_micro_batch(
        session=session, job_id=job_id, epoch=epoch, old=old, new=new, batch_size=batch_size
    )


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint beyond the last N (a file, or a directory for TensorFlow)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
