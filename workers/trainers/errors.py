"""Exceptions a trainer raises to say how it ended; ``workers.trainers.main`` maps them to codes.

Anything else a trainer raises is classified there too: the framework's out-of-memory errors
are ``oom``, an ``OSError`` is ``infra``, every other exception is ``user_error``.
"""

from __future__ import annotations


class StopRequested(Exception):
    """The supervisor asked the trainer to stop; a checkpoint was saved first."""


class UserError(Exception):
    """The spec or the job's data is wrong; retrying will not help."""


class InjectedTransientError(OSError):
    """An injected transient fault (faults.fail_with = transient); a retry succeeds."""


class WorkerError(OSError):
    """This worker cannot run the job as launched (say no usable GPU); another attempt may."""
