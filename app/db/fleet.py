"""Read-only views of the fleet: totals for ``GET /v1/fleet`` and the ``/metrics`` gauges, from
the fleet counters (``app.db.counters``), not from history."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.db import counters
from app.db.devices import list_devices
from app.domain.states import EventKind


def job_counts(*, session: Session) -> dict[str, int]:
    return counters.by_status(counters.job_counts(session=session))


def queue_depths(*, session: Session) -> dict[str, int]:
    """Queued jobs per queue, from Postgres (the truth), not from the broker."""
    return counters.queued_by_queue(counters.job_counts(session=session))


def event_counts(*, session: Session, kinds: list[EventKind]) -> dict[str, int]:
    return counters.event_counts(session=session, kinds=kinds)


def fleet_summary(*, session: Session) -> dict[str, Any]:
    devices = list_devices(session=session)
    alive = [d for d in devices if d["alive"]]
    by_type: dict[str, dict[str, int]] = {}
    by_host: dict[str, dict[str, int]] = {}
    for d in alive:
        state = "busy" if d["current_job"] else "idle"
        for key, table in ((d["type"], by_type), (d["host"], by_host)):
            entry = table.setdefault(key, {"devices": 0, "busy": 0, "idle": 0})
            entry["devices"] += 1
            entry[state] += 1
    utilizations = [d["sample"]["utilization"] for d in alive if d["sample"]]
    counts = counters.job_counts(session=session)
    return {
        "devices": {
            "registered": len(devices),
            "alive": len(alive),
            "busy": sum(1 for d in alive if d["current_job"]),
            "idle": sum(1 for d in alive if not d["current_job"]),
            "suspect": sum(1 for d in alive if d["suspect"]),
            "by_type": by_type,
            "by_host": by_host,
        },
        "jobs": counters.by_status(counts),
        "queues": counters.queued_by_queue(counts),
        "utilization": round(sum(utilizations) / len(utilizations), 4) if utilizations else None,
        "simulated": any(d["simulated"] for d in alive),
    }
