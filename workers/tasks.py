"""The body of ``run_job``: as thin as a view. The lease lifecycle lives in ``supervisor``."""

from __future__ import annotations

import logging
import uuid

from app.settings import get_settings
from workers import identity
from workers.supervisor import Supervisor

log = logging.getLogger(__name__)


def run_job_now(job_id: str) -> str:
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        log.error("run_job got %r, which is not a job id; dropped", job_id)
        return "invalid"
    outcome = Supervisor(get_settings(), identity.current()).run(parsed)
    return outcome.value
