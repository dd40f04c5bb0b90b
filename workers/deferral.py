"""Before a worker leases a job, it may let it go to a more plentiful GPU type.

The rule is ``app.domain.scarcity.defer_to``; this module carries it out: send the job's
wake-up to the plentiful type's queue, then wait at most ``GPUFLEET_SCARCE_DEFER_S`` for one of
its devices to win the lease. Whatever happens, the caller then tries the lease as usual: if the
job was taken it is skipped, else this worker runs it, so a job is never left waiting on a
device that went away. Any database or broker error skips the deferral: placement is a
preference, never a reason not to run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from app.db import placement
from app.db.session import session_scope
from app.domain.routing import job_tier, queue_name
from app.domain.scarcity import defer_to
from app.queue import Dispatcher
from app.settings import Settings

log = logging.getLogger(__name__)

#: how often the deferring worker looks whether the job was taken.
POLL_S = 0.05


_dispatchers: dict[str, Dispatcher] = {}


def _dispatcher(settings: Settings) -> Dispatcher:
    """One sender per broker for the life of the pool process."""
    if settings.broker_url not in _dispatchers:
        _dispatchers[settings.broker_url] = Dispatcher(settings)
    return _dispatchers[settings.broker_url]


def target_queue(settings: Settings, device_uuid: str, job_id: uuid.UUID) -> tuple[str, int] | None:
    """(queue, priority) of the plentiful type to hand the job to, or None to run it here."""
    with session_scope(settings.database_url) as session:
        job = placement.waiting_job(session=session, job_id=job_id)
        if job is None or (len(job.gpu_types) == 1 and job.gpu_types[0].lower() != "any"):
            return None  # taken, ended, or one type only: nothing to choose
        mine = placement.device_type(session=session, uuid_=device_uuid)
        if mine is None:
            return None
        target = defer_to(
            my_type=mine[0],
            job_types=job.gpu_types,
            job_memory_gb=job.memory_gb,
            framework=job.framework,
            devices=placement.live_devices(session=session),
        )
    if target is None:
        return None
    return queue_name(target, job_tier(job.memory_gb), job.framework), job.priority


def defer_if_scarce(
    settings: Settings,
    device_uuid: str | None,
    job_id: uuid.UUID,
    *,
    send: Callable[[uuid.UUID, str, int], bool] | None = None,
) -> bool:
    """Hand the job to a more plentiful type and wait (bounded) for it to be taken there.
    True if it was taken elsewhere meanwhile."""
    if settings.scarce_defer_s <= 0 or device_uuid is None:
        return False
    try:
        target = target_queue(settings, device_uuid, job_id)
        if target is None:
            return False
        queue, priority = target
        sent = (send or wakeup_sender(settings))(job_id, queue, priority)
        if not sent:
            return False
        log.info("job %s: deferred to %s (a more plentiful idle GPU type fits)", job_id, queue)
        if taken_elsewhere(settings, job_id, settings.scarce_defer_s):
            return True
    except SQLAlchemyError as exc:
        log.warning("job %s: placement check failed (%s); taking it here", job_id, exc)
        return False
    log.info(
        "job %s: no device of %s took it in %.1fs; taking it here",
        job_id,
        queue,
        settings.scarce_defer_s,
    )
    return False


def taken_elsewhere(settings: Settings, job_id: uuid.UUID, bound_s: float) -> bool:
    """Wait at most ``bound_s`` for the job to leave the queue (another worker leased it, or it
    was cancelled). SQLAlchemyError if the database cannot say: the caller takes the job."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        with session_scope(settings.database_url) as session:
            if not placement.still_queued(session=session, job_id=job_id):
                return True
    return False


def wakeup_sender(settings: Settings) -> Callable[[uuid.UUID, str, int], bool]:
    """Send a job's wake-up to one queue (``Dispatcher.dispatch``)."""
    dispatcher = _dispatcher(settings)
    return lambda job_id, queue, priority: dispatcher.dispatch(
        job_id=job_id, queue=queue, priority=priority
    )
