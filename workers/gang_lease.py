"""A worker's part in gangs (jobs of ``gpu_count`` > 1) around the lease: lead one, or sit one
out.

- :func:`win`: the worker that took a gang job's wake-up leads it if its own host has the
  devices now (``app.db.gangs.acquire_gang``: its own device and N-1 more of its host, all or
  nothing). If not, and another host could hold the gang now, it passes the wake-up on at once;
  otherwise the job waits for devices to free and the reaper's outbox wakes it again.
- :func:`sit_out`: a worker whose device another worker's gang holds is still consuming its
  queues; a wake-up it takes meanwhile is handed back (it cannot lease) and it stays inside
  the task, taking nothing, until the gang lets its device go. So the gang's member workers
  stay out until the gang ends, without a wake-up lost.

Any database or broker error leaves the job to the reaper's outbox: it is never lost.
"""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy.exc import SQLAlchemyError

from app.db import gangs
from app.db.leases import LeaseGrant
from app.db.session import session_scope
from app.queue import Dispatcher
from app.settings import Settings
from workers import drain
from workers.identity import WorkerIdentity

log = logging.getLogger(__name__)

#: how often a sitting-out member looks whether the gang let its device go.
SIT_OUT_POLL_S = 0.5


def win(settings: Settings, identity: WorkerIdentity, job_id: uuid.UUID) -> LeaseGrant | None:
    """Lead the job's gang on this host, or None (not a gang job, not due, or no room here)."""
    if identity.device_uuid is None:
        return None
    with session_scope(settings.database_url) as session:
        request = gangs.gang_request(session=session, job_id=job_id)
        if request is None:
            return None
        grant = gangs.acquire_gang(
            session=session,
            job_id=job_id,
            worker=identity.worker,
            device_uuid=identity.device_uuid,
            host=settings.hostname,
            gpu_count=request.gpu_count,
            gpu_type=request.gpu_type,
            memory_gb=request.memory_gb,
            ttl=settings.lease_ttl,
        )
        if grant is not None:
            log.info(
                "job %s epoch %s: leading a gang of %d on %s: %s",
                job_id,
                grant.epoch,
                request.gpu_count,
                settings.hostname,
                ", ".join(grant.devices),
            )
            return grant.as_lease()
        free = gangs.free_fitting_per_host(
            session=session,
            gpu_type=request.gpu_type,
            memory_gb=request.memory_gb,
            framework=request.framework,
        )
    elsewhere = sorted(
        host
        for host, count in free.items()
        if host != settings.hostname and count >= request.gpu_count
    )
    if elsewhere:
        log.info(
            "job %s: a gang of %d does not fit on %s now; passed on (%s could hold it)",
            job_id,
            request.gpu_count,
            settings.hostname,
            ", ".join(elsewhere),
        )
        Dispatcher(settings).dispatch(job_id=job_id, queue=request.queue, priority=request.priority)
    else:
        log.info(
            "job %s: no host has %d free devices for its gang now; it waits for devices",
            job_id,
            request.gpu_count,
        )
    return None


def release(settings: Settings, grant: LeaseGrant) -> None:
    """Give the gang's devices back after its lease ended (the reaper does it otherwise)."""
    try:
        with session_scope(settings.database_url) as session:
            gangs.release_gang(session=session, job_id=grant.job_id, epoch=grant.epoch)
    except SQLAlchemyError as exc:
        log.warning(
            "job %s: could not release its gang (%s); left to the reaper", grant.job_id, exc
        )


def sit_out(settings: Settings, identity: WorkerIdentity, job_id: uuid.UUID) -> bool:
    """If another worker's gang holds this worker's device: hand ``job_id``'s wake-up back and
    wait until the gang lets the device go (or this worker shuts down). True if it sat out."""
    device = identity.device_uuid
    if device is None:
        return False
    try:
        with session_scope(settings.database_url) as session:
            held = gangs.membership(session=session, device_uuid=device)
            if held is None or held.leader == identity.worker:
                return False
            wakeup = gangs.queued_wakeup(session=session, job_id=job_id)
        if wakeup is not None:
            queue, priority = wakeup
            Dispatcher(settings).dispatch(job_id=job_id, queue=queue, priority=priority)
        log.info(
            "device %s is in the gang of job %s (led by %s): wake-up of job %s handed back; "
            "taking nothing until the gang ends",
            device,
            held.job_id,
            held.leader,
            job_id,
        )
        while not drain.requested(identity.drain_file):
            time.sleep(SIT_OUT_POLL_S)
            with session_scope(settings.database_url) as session:
                now = gangs.membership(session=session, device_uuid=device)
            if now is None or (now.job_id, now.epoch) != (held.job_id, held.epoch):
                break
    except SQLAlchemyError as exc:
        log.warning("gang membership check failed (%s); the reaper's outbox covers", exc)
        return False
    log.info("device %s: the gang of job %s let it go", device, held.job_id)
    return True
