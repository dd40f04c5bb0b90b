"""A worker's part in gangs (jobs of ``gpu_count`` > 1) around the lease: lead one, or sit one
out.

- :func:`win`: the worker that took a gang job's wake-up first lets a host whose free count
  fits the gang more tightly take it, for a bounded time (``workers.placement``); then it
  leads it if its own host has the devices now (``app.db.gangs.acquire_gang``: its own device
  and N-1 more of its host, all or nothing). If not, and another host could hold the gang
  now, it passes the wake-up on at once. If no host can, the worker of the host closest to
  holding it *holds*: it reserves N devices of its host, busy ones included, so that no
  single-GPU job starts on them once they free and a stream of single-GPU jobs cannot starve
  the gang, for at most ``GPUFLEET_GANG_HOLD_S`` (then the devices go back and the reaper's
  outbox wakes the job again later).
- :func:`sit_out`: a worker whose device another worker's gang holds (or a waiting gang has
  reserved) is still consuming its queues; a wake-up it takes meanwhile is handed back (it
  cannot lease) and it stays inside the task, taking nothing, until its device is let go. So
  the gang's member workers stay out until the gang ends, without a wake-up lost.

Any database or broker error leaves the job to the reaper's outbox: it is never lost.
"""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.db import gangs
from app.db.leases import LeaseGrant
from app.db.session import session_scope
from app.queue import Dispatcher
from app.settings import Settings
from workers import drain
from workers.identity import WorkerIdentity
from workers.placement import defer_gang

log = logging.getLogger(__name__)

#: how often a sitting-out member looks whether the gang let its device go.
SIT_OUT_POLL_S = 0.5
#: how often a holding worker reserves newly freed devices and tries to lead the gang.
HOLD_POLL_S = 0.2


def win(settings: Settings, identity: WorkerIdentity, job_id: uuid.UUID) -> LeaseGrant | None:
    """Lead the job's gang on this host, or None (not a gang job, not due, or no room here).

    Where no host has the devices free now, the worker of the host closest to holding the gang
    (the most free fitting devices among hosts with enough live ones) holds: it reserves its
    host's idle fitting devices as they free and tries again, for at most
    ``settings.gang_hold_s`` (:func:`_hold`)."""
    device = identity.device_uuid
    if device is None:
        return None
    with session_scope(settings.database_url) as session:
        request = gangs.gang_request(session=session, job_id=job_id)
    if request is None:
        return None
    if defer_gang(settings, job_id, request):
        return None  # a host that fits it more tightly took it
    with session_scope(settings.database_url) as session:
        grant = _acquire(session, settings, identity, job_id, request)
        if grant is not None:
            return grant
        free = gangs.free_fitting_per_host(
            session=session,
            gpu_type=request.gpu_type,
            memory_gb=request.memory_gb,
            framework=request.framework,
            job_id=job_id,
        )
        live = gangs.live_fitting_per_host(
            session=session,
            gpu_type=request.gpu_type,
            memory_gb=request.memory_gb,
            framework=request.framework,
        )
    n, here = request.gpu_count, settings.hostname
    elsewhere = sorted(h for h, count in free.items() if h != here and count >= n)
    if elsewhere:
        log.info(
            "job %s: a gang of %d does not fit on %s now; passed on (%s could hold it)",
            job_id,
            n,
            here,
            ", ".join(elsewhere),
        )
        _dispatch(settings, job_id, request)
        return None
    could = {h: free.get(h, 0) for h, count in live.items() if count >= n}
    if here in could and settings.gang_hold_s > 0 and could[here] >= max(could.values()):
        return _hold(settings, identity, job_id, request)
    if could and max(could.values()) > 0 and here not in could:
        _dispatch(settings, job_id, request)  # a worker of a host that could hold it holds
    log.info("job %s: no host has %d free devices for its gang now; it waits", job_id, n)
    return None


def _acquire(
    session: Session,
    settings: Settings,
    identity: WorkerIdentity,
    job_id: uuid.UUID,
    request: gangs.GangRequest,
) -> LeaseGrant | None:
    assert identity.device_uuid is not None
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
    if grant is None:
        return None
    gangs.unreserve(session=session, job_id=job_id)
    log.info(
        "job %s epoch %s: leading a gang of %d on %s: %s",
        job_id,
        grant.epoch,
        request.gpu_count,
        settings.hostname,
        ", ".join(grant.devices),
    )
    return grant.as_lease()


def _hold(
    settings: Settings, identity: WorkerIdentity, job_id: uuid.UUID, request: gangs.GangRequest
) -> LeaseGrant | None:
    """Reserve N fitting devices of this host for the gang (idle ones first; busy ones finish
    their job and take no other), and try to lead it, until it is won, another host can hold
    it, it is taken or cancelled, or ``gang_hold_s`` has passed (then the devices go back to
    single-GPU jobs; the reaper's outbox wakes the job again later)."""
    deadline = time.monotonic() + settings.gang_hold_s
    log.info(
        "job %s: holding %s's devices for a gang of %d as they free (at most %.0fs)",
        job_id,
        settings.hostname,
        request.gpu_count,
        settings.gang_hold_s,
    )
    try:
        while time.monotonic() < deadline and not drain.requested(identity.drain_file):
            with session_scope(settings.database_url) as session:
                if gangs.gang_request(session=session, job_id=job_id) is None:
                    return None  # taken elsewhere, cancelled
                assert identity.device_uuid is not None
                gangs.reserve(
                    session=session,
                    job_id=job_id,
                    device_uuid=identity.device_uuid,
                    host=settings.hostname,
                    gpu_count=request.gpu_count,
                    gpu_type=request.gpu_type,
                    memory_gb=request.memory_gb,
                    framework=request.framework,
                    ttl=settings.lease_ttl,
                )
            with session_scope(settings.database_url) as session:
                grant = _acquire(session, settings, identity, job_id, request)
                free = (
                    {}
                    if grant is not None
                    else gangs.free_fitting_per_host(
                        session=session,
                        gpu_type=request.gpu_type,
                        memory_gb=request.memory_gb,
                        framework=request.framework,
                        job_id=job_id,
                    )
                )
            if grant is not None:
                return grant
            if any(h != settings.hostname and n >= request.gpu_count for h, n in free.items()):
                log.info("job %s: another host can hold the gang now; passed on", job_id)
                _dispatch(settings, job_id, request)
                return None
            time.sleep(HOLD_POLL_S)
    finally:
        with session_scope(settings.database_url) as session:
            gangs.unreserve(session=session, job_id=job_id)
    log.info("job %s: held devices for %.0fs in vain; given back", job_id, settings.gang_hold_s)
    return None


def _dispatch(settings: Settings, job_id: uuid.UUID, request: gangs.GangRequest) -> None:
    Dispatcher(settings).dispatch(job_id=job_id, queue=request.queue, priority=request.priority)


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
    """If another worker's gang holds this worker's device, or keeps it idle for a waiting gang:
    hand ``job_id``'s wake-up back and wait until the device is let go (or this worker shuts
    down). True if it sat out."""
    device = identity.device_uuid
    if device is None:
        return False
    try:
        with session_scope(settings.database_url) as session:
            held = _kept_by(session, device, identity.worker)
            if held is None:
                return False
            wakeup = gangs.queued_wakeup(session=session, job_id=job_id)
        if wakeup is not None:
            queue, priority = wakeup
            Dispatcher(settings).dispatch(job_id=job_id, queue=queue, priority=priority)
        log.info(
            "device %s is kept for %s: wake-up of job %s handed back; taking nothing meanwhile",
            device,
            held,
            job_id,
        )
        while not drain.requested(identity.drain_file):
            time.sleep(SIT_OUT_POLL_S)
            with session_scope(settings.database_url) as session:
                if _kept_by(session, device, identity.worker) != held:
                    break
    except SQLAlchemyError as exc:
        log.warning("gang membership check failed (%s); the reaper's outbox covers", exc)
        return False
    log.info("device %s: %s let it go", device, held)
    return True


def _kept_by(session: Session, device: str, worker: str) -> str | None:
    """Who keeps this worker's device from its own jobs: another worker's gang, or a waiting
    gang's reservation (named for the log), or None."""
    held = gangs.membership(session=session, device_uuid=device)
    if held is not None and held.leader != worker:
        return f"the gang of job {held.job_id} epoch {held.epoch} (led by {held.leader})"
    if held is None:
        reserved = gangs.reserved_for_other(session=session, device_uuid=device)
        if reserved is not None:
            return f"the waiting gang of job {reserved}"
    return None
