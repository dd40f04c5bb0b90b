"""The lease lifecycle around a trainer: win the lease, run the trainer under watch, end it.

The supervisor runs in the Celery task process. It wins the lease (for a job of several GPUs,
a gang of this host's devices that it leads: ``workers.gang_lease``), then runs the trainer
(``workers.trainer_process``; a gang's ranks: ``workers.gang.GangProcess``) under watch
(``workers.watch``) until it exits, and lets one pure function (``app.domain.outcome.decide``)
say how the run ends: finish, fail, requeue with backoff, hand back, shrink the micro-batch and
start again in the same lease, or write nothing because the lease is gone. Every write goes
through one fenced writer (``LeaseWriter``).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app import snapshots
from app.db import devices as device_rows
from app.db import leases, owners
from app.db.artifacts import StoredArtifact
from app.db.session import session_scope
from app.domain import outcome as decision
from app.domain.retry import accumulation_for, infra_backoff
from app.domain.routing import DEFAULT_FRAMEWORK
from app.domain.spec import JobSpec
from app.domain.states import ErrorKind, JobStatus, LeaseOutcome
from app.domain.stopping import StopReason
from app.settings import Settings
from app.storage import Store, is_remote, open_store
from workers import artifacts, command_job, gang_lease
from workers.checkpoint_sync import prepare_resume
from workers.gang import (
    GangProcess,
    leader_first,
    replica_environment,
    replicas_in_one_process,
)
from workers.handoff import Handoff
from workers.identity import WorkerIdentity
from workers.lease_writer import LeaseWriter
from workers.trainer_process import TrainerProcess
from workers.trainers.protocol import Launch
from workers.warm_spare import WarmSpare
from workers.watch import TrainerRun, WatchSettings, watch

log = logging.getLogger(__name__)


#: a command job's ``GPUFLEET_OUTPUT_DIR``, under its checkpoint directory.
OUTPUT_DIR = "output"


class Outcome(StrEnum):
    SKIPPED = "skipped"  #: someone else holds the job (duplicate delivery): not an error
    SUCCEEDED = "succeeded"  #: the job finished with a result
    FAILED = "failed"  #: the job failed for good
    CANCELLED = "cancelled"  #: the job was cancelled
    REQUEUED = "requeued"  #: handed back for a retry with backoff
    LEASE_LOST = "lease_lost"  #: the lease was taken away; this worker stopped writing


#: outcomes written by an end statement (``leases.finish``, ``requeue_for_retry``), which
#: also marked the device idle.
ENDED = frozenset({Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED, Outcome.REQUEUED})


class Supervisor:
    def __init__(
        self, settings: Settings, identity: WorkerIdentity, *, spare: WarmSpare | None = None
    ) -> None:
        self.settings = settings
        self.identity = identity
        #: a trainer started ahead of time (``workers.warm_spare``), replaced after each job.
        self.spare = spare
        #: how long an end-of-run write is retried while the database is unreachable: as long
        #: as the lease survives without a heartbeat. Giving up leaves the job to the reaper.
        self.end_budget = settings.lease_ttl - 2 * settings.heartbeat_interval

    def run(self, job_id: uuid.UUID) -> Outcome:
        with session_scope(self.settings.database_url) as session:
            grant = leases.acquire_lease(
                session=session,
                job_id=job_id,
                worker=self.identity.worker,
                device_uuid=self.identity.device_uuid,
                ttl=self.settings.lease_ttl,
            )
        if grant is None:  # or a job of several GPUs: this worker may lead its gang
            grant = gang_lease.win(self.settings, self.identity, job_id)
        if grant is None:
            log.info("job %s: not leased (already taken, finished or not due); ack", job_id)
            return Outcome.SKIPPED
        log.info("job %s epoch %s: leased (attempt %s)", job_id, grant.epoch, grant.attempt)
        # (the lease statement marked the device busy; the end statement marks it idle)
        outcome = Outcome.LEASE_LOST
        try:
            outcome = self._run_lease(grant)
        except SQLAlchemyError as exc:
            # An end-of-run write gave up on an unreachable database: the lease expires and the
            # reaper requeues the job.
            log.error(
                "job %s epoch %s: could not end the run (%s); left to the reaper",
                job_id,
                grant.epoch,
                exc,
            )
            outcome = Outcome.LEASE_LOST
        finally:
            if grant.gang:
                gang_lease.release(self.settings, grant)
            if outcome not in ENDED:  # an end statement marked the device idle already
                self._mark_device_idle()
            if self.spare is not None:
                self.spare.start(_framework(grant.spec))
        log.info("job %s epoch %s: %s", job_id, grant.epoch, outcome.value)
        return outcome

    def _mark_device_idle(self) -> None:
        device = self.identity.device_uuid
        if device is None:
            return
        try:
            with session_scope(self.settings.database_url) as session:
                device_rows.set_current_job(
                    session=session, uuid=device, worker=self.identity.worker, job_id=None
                )
        except SQLAlchemyError as exc:  # telemetry only; the lease is what matters
            log.warning("could not mark device %s busy/idle: %s", device, exc)

    def _run_lease(self, grant: leases.LeaseGrant) -> Outcome:
        handoff = self.identity.handoff_dir
        writer = LeaseWriter(
            self.settings.database_url,
            grant.job_id,
            grant.epoch,
            ttl=self.settings.lease_ttl,
            handoff=Handoff(handoff) if handoff is not None else None,
        )
        try:
            spec = JobSpec.model_validate(grant.spec)
        except ValueError as exc:
            return self._apply(
                decision.Fail(ErrorKind.USER_ERROR, f"invalid spec: {exc}"), grant, writer, None
            )
        user_code = spec.command is not None or spec.snapshot is not None
        if user_code and not self.settings.command_jobs:
            refused = "this worker does not run command jobs (GPUFLEET_COMMAND_JOBS is off)"
            return self._apply(decision.Fail(ErrorKind.USER_ERROR, refused), grant, writer, spec)
        batch = spec.training.batch_size
        micro = min(grant.micro_batch or batch, batch)
        checkpoints = self._resume_points(grant, writer) if grant.checkpoints else []
        started_at = time.monotonic()
        while True:
            run = self._run_trainer(grant, spec, micro, checkpoints, writer, started_at)
            end = decision.decide(
                decision.RunFacts(
                    stop=run.stop,
                    exit_code=run.exit_code,
                    has_result=run.result is not None,
                    micro_batch=micro,
                    failure_message=run.failure.message if run.failure else None,
                    device_suspect=getattr(run.failure, "device_suspect", False),
                    worker=self.identity.worker,
                    device=self.identity.device_uuid or "(none)",
                    max_runtime_s=spec.max_runtime or 0.0,
                )
            )
            if not isinstance(end, decision.Shrink):
                return self._apply(end, grant, writer, spec, run)
            if not writer.shrink(
                old=micro, new=end.micro_batch, batch_size=batch, budget=self.end_budget
            ):
                return Outcome.LEASE_LOST
            log.warning(
                "%s: OOM at micro-batch %s; retrying with %s x %s",
                writer.tag,
                micro,
                end.micro_batch,
                accumulation_for(batch, end.micro_batch),
            )
            micro = end.micro_batch
            checkpoints = self._resume_points(grant, writer)

    def _checkpoint_dir(self, job_id: uuid.UUID) -> Path:
        return (self.settings.checkpoint_root / str(job_id)).resolve()

    def _checkpoint_store(self) -> Store | None:
        """Where checkpoints are uploaded: the store ``GPUFLEET_STORAGE_URL`` names, if any."""
        return open_store(self.settings) if is_remote(self.settings) else None

    def _resume_points(self, grant: leases.LeaseGrant, writer: LeaseWriter) -> list[str]:
        """The recorded checkpoints to resume from, checked, downloaded here if need be."""
        paths = prepare_resume(
            writer.recorded_checkpoints(),
            self._checkpoint_dir(grant.job_id),
            self._checkpoint_store(),
            writer,
        )
        return [str(p) for p in paths]

    def _apply(
        self,
        end: decision.Decision,
        grant: leases.LeaseGrant,
        writer: LeaseWriter,
        spec: JobSpec | None,
        run: TrainerRun | None = None,
    ) -> Outcome:
        """Write the decided end of the run; the outcome the task reports."""
        budget = self.end_budget
        if isinstance(end, decision.Abandon):
            return Outcome.LEASE_LOST
        if isinstance(end, decision.Succeed):
            assert run is not None and run.result is not None
            try:
                stored = self._upload_artifacts(grant, run.result.model_path)
            except Exception as exc:  # the store or the disk: the job's work is not lost yet
                message = f"could not upload the artifacts: {exc}"
                return self._apply(
                    decision.Requeue(message, counted=True, immediate=False),
                    grant,
                    writer,
                    spec,
                )
            if stored and not writer.artifacts(stored, budget=budget):
                return Outcome.LEASE_LOST
            result = run.result.model_dump(exclude={"type"})
            done = writer.finish(LeaseOutcome.SUCCEEDED, result=result, budget=budget)
            return Outcome.SUCCEEDED if done else Outcome.LEASE_LOST
        if isinstance(end, decision.Fail):
            error = {"kind": end.kind.value, "message": end.message}
            done = writer.finish(LeaseOutcome.FAILED, error=error, budget=budget)
            return Outcome.FAILED if done else Outcome.LEASE_LOST
        if isinstance(end, decision.Cancel):
            error = {"kind": ErrorKind.CANCELLED.value, "message": "cancelled by request"}
            done = writer.finish(LeaseOutcome.CANCELLED, error=error, budget=budget)
            return Outcome.CANCELLED if done else Outcome.LEASE_LOST
        assert isinstance(end, decision.Requeue)
        if end.suspect_device is not None:
            self._mark_device_suspect(grant, end.suspect_device)
        if run is not None and run.stop is StopReason.DATABASE_UNREACHABLE:
            # The watchdog spent the usual budget already; the lease is ours until the reaper,
            # back from the same outage, waits its grace out. Keep trying that long.
            budget = self.settings.lease_ttl + self.settings.reaper_interval
        backoff = 0.0 if end.immediate else infra_backoff(grant.attempt)
        status = writer.requeue(
            message=end.message, backoff_s=backoff, counted=end.counted, budget=budget
        )
        if status is None:
            return Outcome.LEASE_LOST
        if status == JobStatus.CANCELLED:
            return Outcome.CANCELLED
        if status.is_final:
            return Outcome.FAILED
        if end.immediate and spec is not None:
            # Wake another worker now rather than leave the job until the reaper's next pass
            # (which still covers a failed send).
            from app.queue import Dispatcher

            Dispatcher(self.settings).dispatch(
                job_id=grant.job_id, queue=spec.queue, priority=spec.priority
            )
        return Outcome.REQUEUED

    def _upload_artifacts(
        self, grant: leases.LeaseGrant, model_path: str | None
    ) -> list[StoredArtifact]:
        """Upload what the job left in its output directory, and a built-in's model."""
        output_dir = self._checkpoint_dir(grant.job_id) / OUTPUT_DIR
        files = artifacts.collect(output_dir, model_path)
        if not files:
            return []
        return artifacts.upload(open_store(self.settings), grant.job_id, grant.epoch, files)

    def _mark_device_suspect(self, grant: leases.LeaseGrant, failure: str) -> None:
        """The trainer died of what looks like a fault of this GPU: no job starts on it until
        its keeper's health check passes (``workers.claim.DeviceKeeper``)."""
        device = self.identity.device_uuid
        if device is None:
            return
        reason = f"job {grant.job_id} attempt {grant.attempt}: {failure[:500]}"
        try:
            with session_scope(self.settings.database_url) as session:
                device_rows.mark_suspect(
                    session=session, uuid=device, worker=self.identity.worker, reason=reason
                )
        except SQLAlchemyError as exc:  # not fenced by the lease: a failure here changes nothing
            log.warning("could not mark device %s suspect: %s", device, exc)
            return
        log.error("device %s marked suspect: %s", device, reason)

    def _run_trainer(
        self,
        grant: leases.LeaseGrant,
        spec: JobSpec,
        micro: int,
        checkpoints: list[str],
        writer: LeaseWriter,
        lease_started_at: float,
    ) -> TrainerRun:
        cfg = WatchSettings(
            heartbeat_interval=self.settings.heartbeat_interval,
            watchdog_budget=self.settings.lease_ttl - 2 * self.settings.heartbeat_interval,
            checkpoints_keep=self.settings.checkpoints_keep,
            drain_flag=self.identity.drain_file,
            broker_url=self.settings.broker_url,
            max_runtime_s=spec.max_runtime,
            lease_started_at=lease_started_at,
            store=self._checkpoint_store(),
        )
        with tempfile.TemporaryDirectory(prefix="gpufleet-") as tmp:
            launch_file = self._launch(grant, spec, micro, checkpoints, Path(tmp))
            gang = leader_first(grant.gang, self.identity.device_uuid) if grant.gang else None
            if spec.command is not None:
                workdir = Path(tmp) / "work"
                snapshot = self._snapshot(grant, spec)
                return command_job.run(
                    launch_file, workdir, writer, cfg, snapshot, gang=gang, cuda=self.identity.cuda
                )
            code: Path | None = None
            if (snapshot := self._snapshot(grant, spec)) is not None:
                # An entrypoint in the job's own code: a cold start, from its working directory.
                code = Path(tmp) / "work"
                code.mkdir()
                if (refused := command_job.unpack_snapshot(snapshot, code)) is not None:
                    return refused
            if gang is not None and replicas_in_one_process(spec):
                env = replica_environment(gang, real_gpus=self.identity.cuda)
                return watch(TrainerProcess.cold(launch_file, code=code, env=env), writer, cfg)
            if gang is not None:
                ranks = GangProcess.start(
                    gang,
                    real_gpus=self.identity.cuda,
                    rank_process=lambda env: TrainerProcess.cold(launch_file, code=code, env=env),
                )
                return watch(ranks, writer, cfg)
            if code is not None:
                return watch(TrainerProcess.cold(launch_file, code=code), writer, cfg)
            warm = self.spare and self.spare.take(_framework(grant.spec), launch_file)
            return watch(warm or TrainerProcess.cold(launch_file), writer, cfg)

    def _snapshot(self, grant: leases.LeaseGrant, spec: JobSpec) -> Callable[[Path], None] | None:
        """How the job's snapshot gets into its working directory, if it has one."""
        snapshot_id = spec.snapshot
        if snapshot_id is None:
            return None

        def fetch(workdir: Path) -> None:
            with session_scope(self.settings.database_url) as session:
                tenant = owners.tenant_of(session=session, job_id=grant.job_id)
            key = snapshots.key(tenant or "", snapshot_id)
            command_job.fetch_snapshot(open_store(self.settings), key, snapshot_id, workdir)

        return fetch

    def _launch(
        self, grant: leases.LeaseGrant, spec: JobSpec, micro: int, checkpoints: list[str], tmp: Path
    ) -> Path:
        launch = Launch(
            job_id=str(grant.job_id),
            epoch=grant.epoch,
            attempt=grant.attempt,
            spec=spec,
            checkpoint_dir=self._checkpoint_dir(grant.job_id),
            resume_from=[Path(p) for p in checkpoints],
            micro_batch=micro,
            data_root=self.settings.data_root.resolve(),
            device="cuda" if self.identity.cuda else "cpu",
            fault_injection=self.settings.fault_injection,
            entrypoint_prefixes=self.settings.entrypoint_prefixes,
        )
        if spec.command is not None:
            launch = launch.model_copy(update={"output_dir": launch.checkpoint_dir / OUTPUT_DIR})
        launch.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = tmp / "launch.json"
        launch.dump(path)
        return path


def _framework(spec: dict[str, Any]) -> str:
    """What a spare should import for a job with this stored spec (``JobSpec.effective_framework``
    without validating it again)."""
    return str(spec.get("framework") or DEFAULT_FRAMEWORK)
