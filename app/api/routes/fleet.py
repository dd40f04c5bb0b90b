"""Devices and fleet totals. A tenant sees the devices, never another tenant's job ids, and
totals of its own jobs; an admin sees the whole fleet."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from app.api.deps import CallerDep, SessionDep, known_query_only
from app.api.errors import responses
from app.api.schemas import DeviceList, DeviceOut, Fleet
from app.db.devices import list_devices
from app.db.fleet import fleet_summary
from app.db.jobs import tenant_counts, tenant_job_ids

router = APIRouter(prefix="/v1", tags=["fleet"], dependencies=[Depends(known_query_only)])


@router.get(
    "/devices",
    operation_id="listDevices",
    response_model=DeviceList,
    responses=responses(401, 403, 422, 503),
)
def get_devices(session: SessionDep, caller: CallerDep) -> DeviceList:
    """Every registered device, its worker, latest sample, and its current job when that job
    is yours (an admin: every job)."""
    devices = list_devices(session=session)
    if caller.scope is not None:
        running = [uuid.UUID(d["current_job"]) for d in devices if d["current_job"]]
        ours = tenant_job_ids(session=session, tenant=caller.scope, job_ids=running)
        mine = {str(j) for j in ours}
        devices = [
            {**d, "current_job": d["current_job"] if d["current_job"] in mine else None}
            for d in devices
        ]
    return DeviceList(devices=[DeviceOut(**d) for d in devices])


@router.get(
    "/fleet", operation_id="fleet", response_model=Fleet, responses=responses(401, 403, 422, 503)
)
def get_fleet(session: SessionDep, caller: CallerDep) -> Fleet:
    """Totals: devices by type and host, busy/idle, utilization; jobs by status and queued
    jobs per queue — every tenant's for an admin, your own otherwise."""
    summary = fleet_summary(session=session)
    if caller.scope is None:
        return Fleet(scope="fleet", **summary)
    jobs, queues = tenant_counts(session=session, tenant=caller.scope)
    return Fleet(scope="tenant", **{**summary, "jobs": jobs, "queues": queues})
