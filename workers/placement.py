"""Before a worker leases a job, it may let a better host take it (``app.domain.fragmentation``).

Like the scarce-type deferral (``workers.deferral``): the worker sends the job's wake-up again to
its stored queue, where the idle workers of the better host wait, then waits at most
``GPUFLEET_PLACEMENT_DEFER_S`` for the job to be taken. Whatever happens the caller then tries
the lease as usual, so the job is never left waiting on a host that went away, and the lease
decides who runs it, once. Another poor worker that takes the second wake-up defers in turn,
once, for the same bound. Any database or broker error skips the deferral: placement is a
preference, never a reason not to run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from app.db import gangs, placement
from app.db.session import session_scope
from app.domain.fragmentation import GANG_WINDOW_S, gang_defers_to, single_defers_to
from app.settings import Settings
from workers.deferral import taken_elsewhere, wakeup_sender

log = logging.getLogger(__name__)

#: sends (job, stored queue, priority); True if sent.
Send = Callable[[uuid.UUID, str, int], bool]


def defer_single(
    settings: Settings, device_uuid: str | None, job_id: uuid.UUID, *, send: Send | None = None
) -> bool:
    """A single-GPU job on a host whose free devices could hold a gang: let a host that could
    not take it. True if it was taken elsewhere meanwhile."""
    if settings.placement_defer_s <= 0 or device_uuid is None:
        return False
    try:
        with session_scope(settings.database_url) as session:
            job = placement.waiting_job(session=session, job_id=job_id)
            request = gangs.gang_request(session=session, job_id=job_id)
            mine = placement.device_type(session=session, uuid_=device_uuid)
            if job is None or request is not None or mine is None:
                return False  # taken, ended, a gang (``defer_gang``), or an unknown device
            size = placement.smallest_gang(
                session=session, gpu_type=mine[0], window_s=GANG_WINDOW_S
            )
            if size is None:
                return False
            free = gangs.free_fitting_per_host(
                session=session,
                gpu_type=list(job.gpu_types),
                memory_gb=job.memory_gb,
                framework=job.framework,
            )
            wakeup = gangs.queued_wakeup(session=session, job_id=job_id)
        target = single_defers_to(free, settings.hostname, size)
        if target is None or wakeup is None:
            return False
        why = f"{target} has a free device that breaks up no room for a gang of {size}"
        return _defer(settings, job_id, wakeup, why, send)
    except SQLAlchemyError as exc:
        log.warning("job %s: placement check failed (%s); taking it here", job_id, exc)
        return False


def defer_gang(
    settings: Settings, job_id: uuid.UUID, request: gangs.GangRequest, *, send: Send | None = None
) -> bool:
    """A gang on a host with more free devices than it needs: let the host that fits it most
    tightly take it. True if it was taken elsewhere meanwhile."""
    if settings.placement_defer_s <= 0:
        return False
    try:
        with session_scope(settings.database_url) as session:
            free = gangs.free_fitting_per_host(
                session=session,
                gpu_type=request.gpu_type,
                memory_gb=request.memory_gb,
                framework=request.framework,
                job_id=job_id,
            )
        target = gang_defers_to(free, settings.hostname, request.gpu_count)
        if target is None:
            return False
        why = (
            f"{target} has {free[target]} free devices, a tighter fit for a gang of "
            f"{request.gpu_count} than {settings.hostname}'s {free[settings.hostname]}"
        )
        return _defer(settings, job_id, (request.queue, request.priority), why, send)
    except SQLAlchemyError as exc:
        log.warning("job %s: placement check failed (%s); taking it here", job_id, exc)
        return False


def _defer(
    settings: Settings, job_id: uuid.UUID, wakeup: tuple[str, int], why: str, send: Send | None
) -> bool:
    """Send the wake-up again and wait (bounded) for the job to leave the queue."""
    queue, priority = wakeup
    if not (send or wakeup_sender(settings))(job_id, queue, priority):
        return False
    log.info("job %s: deferred (%s)", job_id, why)
    if taken_elsewhere(settings, job_id, settings.placement_defer_s):
        return True
    log.info(
        "job %s: no better host took it in %.1fs; taking it here",
        job_id,
        settings.placement_defer_s,
    )
    return False
