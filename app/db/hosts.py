"""Registered hosts as a multi-GPU job sees them: how many of each host's devices fit it."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from app.db.models import Device
from app.domain.routing import GpuTypes, device_fits


def fitting_per_host(
    *, session: Session | Connection, gpu_type: GpuTypes, memory_gb: float
) -> dict[str, int]:
    """Per host with registered devices, how many of them fit the type(s) and memory (0 when
    none do). Every registered device counts, live or not: a host's worker may be restarting."""
    rows = session.execute(select(Device.host, Device.gpu_type, Device.memory_bytes)).all()
    counts: Counter[str] = Counter({r.host: 0 for r in rows})
    for r in rows:
        if device_fits(
            device_type=r.gpu_type,
            device_memory_gib=r.memory_bytes / 2**30,
            job_type=gpu_type,
            job_memory_gb=memory_gb,
        ):
            counts[r.host] += 1
    return dict(counts)
