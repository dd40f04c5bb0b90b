"""A trainer dies with its supervisor.

The supervisor starts the trainer without a ``preexec_fn`` (unsafe once it runs threads), so
the trainer asks the kernel itself, first thing, for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``), then checks that the parent it was started by is still there: if the
supervisor died before the request took effect, the trainer is already orphaned and exits.

A trainer forked by the fork server (``workers.trainers.zygote``) binds to the zygote instead,
which is itself bound to the supervisor; later calls (the trainer's own ``main``) are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

SUPERVISOR_PID_ENV = "GPUFLEET_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1
_bound = False


def bind_to_supervisor(parent: int | None = None) -> None:
    """Die with ``parent`` (by default the supervisor named in the environment)."""
    global _bound
    if _bound and parent is None:
        return
    expected = str(parent) if parent is not None else os.environ.get(SUPERVISOR_PID_ENV)
    if expected is None:  # run by hand, not by a supervisor
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != expected:
        os._exit(1)
    _bound = True
