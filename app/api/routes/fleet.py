"""Devices and fleet totals."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.db.devices import list_devices
from app.db.fleet import fleet_summary

router = APIRouter(prefix="/v1", tags=["fleet"])


@router.get("/devices")
def get_devices(session: SessionDep, _: TenantDep) -> dict[str, Any]:
    """Every registered device, its worker, current job and latest sample."""
    return {"devices": list_devices(session=session)}


@router.get("/fleet")
def get_fleet(session: SessionDep, _: TenantDep) -> dict[str, Any]:
    """Totals: devices by type and host, busy/idle, queued jobs per queue, utilization."""
    return fleet_summary(session=session)
