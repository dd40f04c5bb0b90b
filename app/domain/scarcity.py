"""Keep scarce GPUs for the jobs that need them: when should a device let a job go?

A job that several GPU types fit ("any", or a list of types) is offered to every fitting
device; whichever worker takes the wake-up first would run it. If that worker's type is scarce
(fewer fitting devices than another fitting type) while a device of a more plentiful fitting
type sits idle, running the job here may leave a later job that only the scarce type fits
waiting. The worker then defers: it hands the wake-up to the plentiful type's queue and waits a
short, bounded time for one of those devices to win the lease, taking the job itself if none
does (``workers.deferral``). No central scheduler decides, so none can fail.

Rarity and fit come from the live, registered devices: a type's weight is how many devices of
it are alive, healthy and fit the job (memory tier and framework).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from app.domain.routing import ANY_TYPE, device_fits, normalize_type


@dataclass(frozen=True)
class LiveDevice:
    """A device a live worker holds, as placement sees it."""

    gpu_type: str
    memory_gib: float
    #: no job runs on it now, and it is not suspect.
    idle: bool
    #: the frameworks its worker offers; None: not reported (every framework assumed).
    frameworks: frozenset[str] | None = None


def fitting_types(job_types: Collection[str]) -> frozenset[str] | None:
    """The types a job accepts, normalized; None when any type will do."""
    normalized = {normalize_type(t) for t in job_types}
    return None if ANY_TYPE in normalized else frozenset(normalized)


def defer_to(
    *,
    my_type: str,
    job_types: Collection[str],
    job_memory_gb: float,
    framework: str,
    devices: Sequence[LiveDevice],
) -> str | None:
    """The GPU type this device should hand the job to, or None to run it here.

    It defers only to a type with strictly more fitting live devices than its own, and only
    when one of them is idle now; of several, the most plentiful (then the name, so every
    worker picks the same one).
    """
    accepted = fitting_types(job_types)
    mine = normalize_type(my_type)
    fitting = [
        d
        for d in devices
        if (accepted is None or normalize_type(d.gpu_type) in accepted)
        and (d.frameworks is None or framework in d.frameworks)
        and device_fits(
            device_type=d.gpu_type,
            device_memory_gib=d.memory_gib,
            job_type=ANY_TYPE,
            job_memory_gb=job_memory_gb,
        )
    ]
    counts = Counter(normalize_type(d.gpu_type) for d in fitting)
    idle_types = {normalize_type(d.gpu_type) for d in fitting if d.idle}
    better = [t for t in idle_types if t != mine and counts[t] > counts[mine]]
    if not better:
        return None
    return max(better, key=lambda t: (counts[t], t))
