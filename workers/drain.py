"""Draining: a worker told to shut down hands its running job back instead of sitting on it.

``docker compose stop``, a rolling update or a node drain sends the worker SIGTERM. Celery's warm
shutdown would wait for the running task, which for a training job can mean hours, until the
stop grace period ends in SIGKILL and the reaper, a lease TTL later, requeues the job and spends
an attempt. Instead the worker raises a flag that the job's supervisor (in the pool's child
process) checks on every loop: it asks the trainer to stop, the trainer saves a checkpoint at
its step boundary, and the job is requeued due at once without spending an attempt. The worker
then exits within seconds, and another worker resumes the job from that checkpoint.

The flag is a file, named in the worker's identity (``workers.identity``) before Celery forks
its pool: Celery's prefork children use SIGUSR1 (soft time limits) and SIGTERM themselves, and
a file needs no database round trip on every check.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def prepare(worker: str) -> Path:
    """A fresh (cleared) drain flag for this worker process."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker)
    path = Path(tempfile.gettempdir()) / f"gpufleet-drain-{safe}-{os.getpid()}"
    path.unlink(missing_ok=True)
    return path


def request(path: Path) -> None:
    """Ask the running job to hand itself back (called when the worker starts shutting down)."""
    log.warning("worker shutting down: the running job, if any, checkpoints and is handed back")
    path.touch()


def requested(path: Path | None) -> bool:
    """Has the worker that owns ``path`` been told to shut down? Cheap: one stat()."""
    return path is not None and path.exists()
