"""Read-only views of the fleet: totals for ``GET /v1/fleet`` and the ``/metrics`` gauges."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.devices import list_devices
from app.domain.states import EventKind, JobStatus


def job_counts(*, session: Session) -> dict[str, int]:
    rows = session.execute(text("SELECT status, count(*) AS n FROM jobs GROUP BY status")).all()
    counts = {status.value: 0 for status in JobStatus}
    counts.update({r.status: r.n for r in rows})
    return counts


def queue_depths(*, session: Session) -> dict[str, int]:
    """Queued jobs per queue, from Postgres (the truth), not from the broker."""
    rows = session.execute(
        text("SELECT queue, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY queue")
    ).all()
    return {r.queue: r.n for r in rows}


def event_counts(*, session: Session, kinds: list[EventKind]) -> dict[str, int]:
    rows = session.execute(
        text("SELECT kind, count(*) AS n FROM job_events WHERE kind = ANY(:k) GROUP BY kind"),
        {"k": [k.value for k in kinds]},
    ).all()
    counts = {k.value: 0 for k in kinds}
    counts.update({r.kind: r.n for r in rows})
    return counts


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
    counts = job_counts(session=session)
    return {
        "devices": {
            "registered": len(devices),
            "alive": len(alive),
            "busy": sum(1 for d in alive if d["current_job"]),
            "idle": sum(1 for d in alive if not d["current_job"]),
            "by_type": by_type,
            "by_host": by_host,
        },
        "jobs": counts,
        "queues": queue_depths(session=session),
        "utilization": round(sum(utilizations) / len(utilizations), 4) if utilizations else None,
        "simulated": any(d["simulated"] for d in alive),
    }
