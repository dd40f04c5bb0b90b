"""The body of ``run_job``: as thin as a view. The lease lifecycle lives in ``runner``."""

from __future__ import annotations

import logging
import os
import uuid

from app.settings import get_settings
from workers.runner import Supervisor, WorkerIdentity

log = logging.getLogger(__name__)

WORKER_NAME_ENV = "GPUFLEET_WORKER_NAME"
DEVICE_UUID_ENV = "GPUFLEET_DEVICE_UUID"
DEVICE_SIMULATED_ENV = "GPUFLEET_DEVICE_SIMULATED"


def identity_from_env() -> WorkerIdentity:
    """Who this process works for: set by ``gpufleet worker`` before the pool forks."""
    return WorkerIdentity(
        worker=os.environ.get(WORKER_NAME_ENV, f"worker@{os.uname().nodename}"),
        device_uuid=os.environ.get(DEVICE_UUID_ENV),
        cuda=os.environ.get(DEVICE_SIMULATED_ENV, "1") != "1",
    )


def run_job_now(job_id: str) -> str:
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        log.error("run_job got %r, which is not a job id; dropped", job_id)
        return "invalid"
    outcome = Supervisor(get_settings(), identity_from_env()).run(parsed)
    return outcome.value
