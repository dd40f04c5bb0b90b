"""Why a running trainer is being stopped, and which reason wins when several arrive at once.

A supervisor can learn of several reasons in one run — a cancel, a SIGTERM drain, a lost
device — and the order it notices them in depends on timing. The reason that decides the run's
end must not: it is the one of highest precedence among all that were seen, whatever came first.
The precedence follows urgency: a reason that forbids touching the job or the GPU any longer
beats one that still lets the trainer checkpoint.
"""

from __future__ import annotations

from enum import IntEnum


class StopReason(IntEnum):
    """Higher value, higher precedence."""

    #: the worker is shutting down (SIGTERM): checkpoint, hand back, no attempt spent.
    DRAINING = 1
    #: the attempt ran past the job's ``max_runtime``: checkpoint and fail ``timeout``.
    DEADLINE = 2
    #: a user cancelled the job: checkpoint and end it cancelled.
    CANCELLED = 3
    #: the lease could not be renewed for its watchdog budget (database unreachable): the trainer
    #: was killed; the job goes back without spending an attempt once the database answers.
    DATABASE_UNREACHABLE = 4
    #: this worker's claim on its GPU ended (another worker may start a job there): kill now,
    #: hand back as an infrastructure try.
    DEVICE_LOST = 5
    #: the lease is gone (reaped, taken over): kill now and write nothing more.
    LEASE_LOST = 6

    @property
    def kills(self) -> bool:
        """Kill the trainer at once, rather than ask it to checkpoint and exit."""
        return self >= StopReason.DATABASE_UNREACHABLE


class StopReasons:
    """The reasons seen during one trainer run; ``winner`` is the one that decides its end."""

    def __init__(self) -> None:
        self.winner: StopReason | None = None

    def observe(self, reason: StopReason) -> bool:
        """Record a reason. True when it outranks everything seen so far (act on it now)."""
        if self.winner is not None and reason <= self.winner:
            return False
        self.winner = reason
        return True
