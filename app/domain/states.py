"""Job states, lease outcomes and failure kinds: named once, used everywhere."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"  #: waiting for a worker (maybe until ``retry_at``)
    RUNNING = "running"  #: a worker holds a live lease
    SUCCEEDED = "succeeded"  #: the trainer returned a result
    FAILED = "failed"  #: ended with ``error``; no attempts left or not retryable
    CANCELLED = "cancelled"  #: a user asked to stop it

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Which state may follow which. The conditional statements in ``app.db`` encode this table in
#: their WHERE clauses; ``tests/integration/test_transitions.py`` drives each one against it.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


class LeaseOutcome(StrEnum):
    SUCCEEDED = "succeeded"  #: the job finished successfully under this lease
    FAILED = "failed"  #: the job failed for good under this lease
    CANCELLED = "cancelled"  #: the job was cancelled while this lease ran it
    REQUEUED = "requeued"  #: the holder gave the job back for a retry
    EXPIRED = "expired"  #: the holder went silent; the reaper took the lease back


class ErrorKind(StrEnum):
    OOM = "oom"  #: out of memory even at micro-batch 1
    USER_ERROR = "user_error"  #: bad spec, import error, exception in user code: never retried
    INFRA = "infra"  #: database, broker, IO or a crashed trainer: retried with backoff
    LOST_WORKER = "lost_worker"  #: the worker went silent; the reaper requeued the job
    CANCELLED = "cancelled"  #: a user cancelled the job
    TIMEOUT = "timeout"  #: it ran past its ``max_runtime``; its last checkpoint is kept
    UNSCHEDULABLE = "unschedulable"  #: waited past ``max_wait``, or no device could ever run it


class EventKind(StrEnum):
    SUBMITTED = "submitted"  #: the job was accepted
    REDISPATCHED = "redispatched"  #: the reaper sent a wake-up the broker had lost
    LEASED = "leased"  #: a worker won a lease
    CHECKPOINT = "checkpoint"  #: a checkpoint was recorded
    CHECKPOINT_SKIPPED = "checkpoint_skipped"  #: a checkpoint failed to load on resume
    RESUMED = "resumed"  #: training continued from a checkpoint
    OOM_BACKOFF = "oom_backoff"  #: out of memory: micro-batch halved, accumulation doubled
    RETRY = "retry"  #: requeued with backoff after an infrastructure failure
    HANDED_BACK = "handed_back"  #: its worker was shutting down: requeued, no attempt spent
    LEASE_EXPIRED = "lease_expired"  #: the reaper took the lease back
    CANCEL_REQUESTED = "cancel_requested"  #: a user asked a running job to stop
    SUCCEEDED = "succeeded"  #: finished with a result
    FAILED = "failed"  #: finished with an error
    CANCELLED = "cancelled"  #: stopped by a user
