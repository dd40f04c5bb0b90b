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
"""

from __future__ import annotations

import re
from collections.abc import Collection

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


def job_tier(memory_gb: float) -> int:
    """The smallest tier that holds ``memory_gb``."""
    for tier in TIERS:
        if memory_gb <= tier:
            return tier
    raise RoutingError(
        f"memory_gb {memory_gb:g} is more than the largest GPU tier ({TIERS[-1]} GB); "
        "multi-GPU jobs are not supported yet"
    )


def queue_name(gpu_type: str, tier: int, framework: str = DEFAULT_FRAMEWORK) -> str:
    plain = f"gpu.{gpu_type}.{tier}"
    return plain if framework == DEFAULT_FRAMEWORK else f"{plain}.{framework}"


def job_queue(gpu_type: str, memory_gb: float, framework: str = DEFAULT_FRAMEWORK) -> str:
    return queue_name(normalize_type(gpu_type), job_tier(memory_gb), framework)


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
    *, device_type: str, device_memory_gib: float, job_type: str, job_memory_gb: float
) -> bool:
    """Whether a device could ever run a job (type matches, tier within its memory)."""
    jtype = normalize_type(job_type)
    if jtype != ANY_TYPE and jtype != normalize_type(device_type):
        return False
    return job_tier(job_memory_gb) in device_tiers(device_memory_gib)
