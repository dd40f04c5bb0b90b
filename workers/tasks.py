"""The body of ``run_job``: as thin as a view. The lease lifecycle lives in ``supervisor``."""

from __future__ import annotations

import logging
import uuid

from app.settings import get_settings
from workers import gang_lease, identity
from workers.deferral import defer_if_scarce
from workers.placement import defer_single
from workers.supervisor import Outcome, Supervisor
from workers.warm_spare import WarmSpare

log = logging.getLogger(__name__)

#: this pool process's spare trainer: its jobs run one after another on its main thread.
SPARE = WarmSpare()


def start_spare() -> None:
    """Called as the pool process starts, so that even its first job starts warm."""
    settings = get_settings()
    if settings.warm_spare:
        SPARE.configure(settings.trainer_start)
        SPARE.start("torch")


def run_job_now(job_id: str) -> str:
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        log.error("run_job got %r, which is not a job id; dropped", job_id)
        return "invalid"
    settings = get_settings()
    worker = identity.current()
    if defer_if_scarce(settings, worker.device_uuid, parsed):
        return "skipped"  # a device of a more plentiful type took it
    if defer_single(settings, worker.device_uuid, parsed):
        return "skipped"  # a host whose free devices could hold no gang took it
    spare = SPARE if settings.warm_spare else None
    if spare is not None:
        spare.configure(settings.trainer_start)
    outcome = Supervisor(settings, worker, spare=spare).run(parsed)
    if outcome is Outcome.SKIPPED and gang_lease.sit_out(settings, worker, parsed):
        return "sat out"  # another worker's gang holds this device: it took nothing meanwhile
    return outcome.value
