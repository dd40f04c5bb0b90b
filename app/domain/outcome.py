"""How a trainer run ends: from what the run did to what the supervisor must write. Pure.

The table, in order (the first row that matches decides):

====================================  ==========================================================
the run                               the decision
====================================  ==========================================================
stopped: lease lost                   ``Abandon``: write nothing, the job belongs to another
a result sent                         ``Succeed`` (a result beats a cancel or a drain: the work
                                      is done; so does a crash after it was sent, in the
                                      process's teardown: NCCL's or gloo's threads at exit)
stopped: device lost                  ``Requeue`` due now, counted (an infrastructure try)
stopped: database unreachable         ``Requeue`` due now, not counted (not the job's fault)
stopped: cancelled                    ``Cancel``
stopped: past max_runtime             ``Fail`` timeout (its checkpoints are kept)
stopped: draining, user error exit    ``Fail`` user_error (it failed on its own before the stop)
stopped: draining                     ``Requeue`` due now, not counted (a hand-back)
out of memory, micro-batch > 1        ``Shrink`` to half and restart in the same lease
out of memory at micro-batch 1        ``Fail`` oom
user error exit                       ``Fail`` user_error
a hardware fault of the GPU           ``Requeue`` due now, counted, and the device is marked
                                      suspect (the job goes to another GPU at once)
anything else (infra exit, crash)     ``Requeue`` with backoff, counted
====================================  ==========================================================

"Counted" means the try counts against ``max_attempts``; the database turns an uncounted
requeue into a counted one past the hand-back cap, and any requeue of a job whose cancel was
requested into its cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.domain.retry import next_micro_batch
from app.domain.states import ErrorKind
from app.domain.stopping import StopReason

# The trainer's exit codes (``workers.trainers.protocol`` re-exports them).
EXIT_OK = 0  #: finished; a ``result`` message was sent
EXIT_STOPPED = 40  #: stopped on request after saving a checkpoint
EXIT_OOM = 41  #: out of memory at the current micro-batch
EXIT_USER_ERROR = 42  #: the spec or the user's code is wrong; retrying will not help
EXIT_INFRA = 43  #: a transient or hardware failure; another try may succeed


@dataclass(frozen=True)
class RunFacts:
    """What one trainer run did, as its supervisor saw it."""

    stop: StopReason | None
    exit_code: int | None
    has_result: bool
    micro_batch: int
    failure_message: str | None = None
    #: the trainer's failure looked like a hardware fault of its GPU.
    device_suspect: bool = False
    worker: str = "this worker"
    device: str = "its GPU"
    max_runtime_s: float = 0.0


@dataclass(frozen=True)
class Abandon:
    reason: str


@dataclass(frozen=True)
class Succeed:
    pass


@dataclass(frozen=True)
class Fail:
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class Requeue:
    message: str
    #: counts against max_attempts.
    counted: bool
    #: due at once and woken now (a hand-back), rather than after an infrastructure backoff.
    immediate: bool
    #: mark the device suspect with this reason (a hardware fault), or None.
    suspect_device: str | None = None


@dataclass(frozen=True)
class Shrink:
    micro_batch: int
    message: str


Decision = Abandon | Succeed | Fail | Cancel | Requeue | Shrink


def decide(run: RunFacts) -> Decision:
    """The end of one trainer run (see the module's table)."""
    code, stop = run.exit_code, run.stop
    message = run.failure_message or f"trainer exited with code {code}"
    if stop is StopReason.LEASE_LOST:
        return Abandon("the lease is gone: another worker or the reaper owns the job")
    if run.has_result:
        return Succeed()
    if stop is StopReason.DEVICE_LOST:
        return Requeue(
            f"{run.worker} lost its claim on device {run.device} while the job ran; handed back "
            "for another worker",
            counted=True,
            immediate=True,
        )
    if stop is StopReason.DATABASE_UNREACHABLE:
        return Requeue(
            f"{run.worker} could not reach the database to renew the lease; the trainer was "
            "stopped and the job handed back",
            counted=False,
            immediate=True,
        )
    if stop is StopReason.CANCELLED:
        return Cancel()
    if stop is StopReason.DEADLINE:
        return Fail(
            ErrorKind.TIMEOUT,
            f"ran past its max_runtime ({run.max_runtime_s:g}s); its last checkpoint is kept",
        )
    if stop is StopReason.DRAINING and code != EXIT_USER_ERROR:
        return Requeue(
            f"{run.worker} is shutting down; handed back at its checkpoint",
            counted=False,
            immediate=True,
        )
    if code == EXIT_OOM:
        smaller = next_micro_batch(run.micro_batch)
        if smaller is None:
            return Fail(ErrorKind.OOM, f"out of memory even at micro-batch 1: {message}")
        return Shrink(smaller, message)
    if code == EXIT_USER_ERROR:
        return Fail(ErrorKind.USER_ERROR, message)
    if run.device_suspect:
        return Requeue(message, counted=True, immediate=True, suspect_device=message)
    return Requeue(message, counted=True, immediate=False)
