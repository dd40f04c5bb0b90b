"""Jobs that need several GPUs (``gpu_count`` > 1): which fleets can ever hold them (pure).

A gang runs on the devices of one host: gpufleet has no multi-host rendezvous. So a job asking
for more fitting GPUs than the largest registered host has could never start, and is refused at
submit rather than left waiting for ever.
"""

from __future__ import annotations

from collections.abc import Mapping

#: the most GPUs one job may ask for (the largest single hosts have 16).
MAX_GPU_COUNT = 16


def gang_refusal(*, gpu_count: int, fitting_per_host: Mapping[str, int], wanted: str) -> str | None:
    """Why a job of ``gpu_count`` GPUs is refused at submit, or None."""
    return host_refusal(gpu_count=gpu_count, fitting_per_host=fitting_per_host, wanted=wanted)


def host_refusal(*, gpu_count: int, fitting_per_host: Mapping[str, int], wanted: str) -> str | None:
    """Why a job of ``gpu_count`` GPUs can never run on these hosts, or None.

    ``fitting_per_host``: per registered host, how many of its devices fit the job; ``wanted``
    names the job's type and memory for the message. An empty fleet refuses nothing (workers
    may still be starting).
    """
    if gpu_count <= 1 or not fitting_per_host:
        return None
    host, most = max(fitting_per_host.items(), key=lambda item: (item[1], item[0]))
    if gpu_count <= most:
        return None
    return (
        f"gpu_count {gpu_count} is more than any one host has: the largest has {most} "
        f"GPUs that fit {wanted} ({host}); a job runs on the GPUs of one host (multi-host "
        "jobs are not supported)"
    )
