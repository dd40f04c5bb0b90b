"""Memory tiers and queue names: where a job waits and which queues a device serves.

A job goes to the queue of its GPU type and the smallest tier that holds its memory. A device
serves its own type's queues and ``any``'s for every tier up to its memory, largest tier first,
so a big GPU takes big jobs before small ones (best fit).

Frameworks: a worker consumes only the queues of the frameworks it has (``workers.frameworks``),
so a job is never delivered to a worker that cannot import what it needs. PyTorch jobs (and
custom entrypoints, which run in the torch trainer) keep the plain names, ``gpu.A100.80``; every
other framework's jobs wait in queues named after it, ``gpu.A100.80.tensorflow``. A job's queue
is stored with it at submit, so the reaper's redispatch and a supervisor's hand-back send the
wake-up to the same queue with no further rule.

Alternatives: a job whose ``gpu_type`` is a list (``[V100, T4]``) waits in one queue per type,
stored together as one space-separated string (``gpu.V100.16 gpu.T4.16``). Every wake-up goes
to each of them; the first worker to win the lease runs the job, and the others' deliveries
are the duplicates that any job may get (the lease decides, once).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

#: Memory tiers, in GB.
TIERS: tuple[int, ...] = (8, 16, 24, 32, 40, 48, 80, 96, 141, 192)

ANY_TYPE = "any"

#: The frameworks a worker may offer, in the order it prefers their queues within a tier.
FRAMEWORKS: tuple[str, ...] = ("torch", "tensorflow")
#: The framework of the plain queue names.
DEFAULT_FRAMEWORK = "torch"

#: Cards report less than their marketing size: a "16 GB" T4 measures 15 GiB, an "80 GB" H100
#: 79.6 GiB, a "24 GB" L4 22.5 GiB. A device serves a tier when its measured GiB are within
#: this fraction of the tier.
MEMORY_TOLERANCE = 0.08

_TYPE_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")

#: separates the queues of a job with several GPU types in its stored ``queue``.
QUEUE_SEPARATOR = " "
#: the most alternatives one job may list.
MAX_GPU_TYPES = 8

#: a job's GPU type as given: one name (or ``any``), or a list of alternatives.
GpuTypes = str | Sequence[str]


class RoutingError(ValueError):
    """The job's resources cannot be routed."""


def normalize_type(gpu_type: str) -> str:
    """``a100`` -> ``A100``; ``any`` stays ``any``."""
    value = gpu_type.strip()
    if value.lower() == ANY_TYPE:
        return ANY_TYPE
    if not _TYPE_RE.match(value):
        raise RoutingError(
            f"gpu_type {gpu_type!r} is not a GPU type name (letters and digits, e.g. A100, T4) "
            "or 'any'"
        )
    return value.upper()


def normalize_types(gpu_type: GpuTypes) -> str | list[str]:
    """One type or a list of alternatives, each normalized, duplicates dropped, order kept.

    A list that contains ``any`` is ``any``; a list of one is that type; an empty list is an
    error (a job that fits no GPU would wait for ever)."""
    if isinstance(gpu_type, str):
        return normalize_type(gpu_type)
    names = list(dict.fromkeys(normalize_type(t) for t in gpu_type))
    if not names:
        raise RoutingError("gpu_type is an empty list: name at least one type, or 'any'")
    if len(names) > MAX_GPU_TYPES:
        raise RoutingError(f"gpu_type lists at most {MAX_GPU_TYPES} types, not {len(names)}")
    if ANY_TYPE in names:
        return ANY_TYPE
    return names[0] if len(names) == 1 else names


def type_list(gpu_type: GpuTypes) -> list[str]:
    """The normalized alternatives, always as a list (``any`` is ``["any"]``)."""
    value = normalize_types(gpu_type)
    return [value] if isinstance(value, str) else value


def describe_types(gpu_type: GpuTypes) -> str:
    """How messages name a job's types: ``A100``, or ``V100 or T4``."""
    return " or ".join(type_list(gpu_type))


def job_tier(memory_gb: float) -> int:
    """The smallest tier that holds ``memory_gb``."""
    for tier in TIERS:
        if memory_gb <= tier:
            return tier
    raise RoutingError(
        f"memory_gb {memory_gb:g} is more than the largest GPU tier ({TIERS[-1]} GB); "
        "memory_gb is per GPU"
    )


def queue_name(gpu_type: str, tier: int, framework: str = DEFAULT_FRAMEWORK) -> str:
    plain = f"gpu.{gpu_type}.{tier}"
    return plain if framework == DEFAULT_FRAMEWORK else f"{plain}.{framework}"


def job_queue(gpu_type: GpuTypes, memory_gb: float, framework: str = DEFAULT_FRAMEWORK) -> str:
    """The job's stored queue: one name, or its alternatives' names joined by a space."""
    tier = job_tier(memory_gb)
    return QUEUE_SEPARATOR.join(queue_name(t, tier, framework) for t in type_list(gpu_type))


def split_queues(stored: str) -> list[str]:
    """The queues a stored ``queue`` names (one, or several for alternatives)."""
    return stored.split(QUEUE_SEPARATOR)


def device_tiers(memory_gib: float) -> list[int]:
    """Tiers a device of ``memory_gib`` measured GiB can serve, largest first."""
    limit = memory_gib * (1 + MEMORY_TOLERANCE)
    return sorted((t for t in TIERS if t <= limit), reverse=True)


def device_queues(
    gpu_type: str, memory_gib: float, frameworks: Collection[str] = (DEFAULT_FRAMEWORK,)
) -> list[str]:
    """The queues a device whose worker offers ``frameworks`` consumes, in the order it should
    prefer them (best fit: largest tier first; within a tier, its own type before ``any``)."""
    own = normalize_type(gpu_type)
    queues: list[str] = []
    for tier in device_tiers(memory_gib):
        for framework in FRAMEWORKS:
            if framework in frameworks:
                queues.append(queue_name(own, tier, framework))
                queues.append(queue_name(ANY_TYPE, tier, framework))
    return queues


def device_fits(
    *, device_type: str, device_memory_gib: float, job_type: GpuTypes, job_memory_gb: float
) -> bool:
    """Whether a device could ever run a job (one of its types, tier within its memory)."""
    jtypes = type_list(job_type)
    if ANY_TYPE not in jtypes and normalize_type(device_type) not in jtypes:
        return False
    return job_tier(job_memory_gb) in device_tiers(device_memory_gib)
