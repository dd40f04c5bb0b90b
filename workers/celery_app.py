"""The Celery app of the GPU workers.

Acknowledgement is early (``task_acks_late=False``, Celery's default), chosen on purpose: the
message is only a doorbell and the lease in Postgres decides who runs the job. With late
acknowledgement the Redis transport would hand a still-running job's message to another worker
after ``visibility_timeout``; with early acknowledgement a message lost with a killed worker is
recovered by the reaper, which requeues the expired lease and sends a fresh wake-up.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from app.db.session import dispose_engines
from app.queue import RUN_JOB_TASK, celery_config
from app.settings import get_settings

app = Celery("gpufleet")
app.conf.update(celery_config(get_settings()))
app.conf.update(
    worker_pool="prefork",
    worker_concurrency=1,
    # One long-lived pool process takes job after job: replacing it after each job kept the
    # GPU idle ~2.7 s between jobs. Nothing leaks from one job into the next: the pool process
    # never touches CUDA, and each job's trainer is a process of its own, group and all.
    # A busy worker must not sit on a waiting job's message.
    worker_disable_prefetch=True,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # The parent opened database connections to claim its device; a forked child must not
    # share those sockets. Quick and non-blocking: worker_process_init has a 4 s budget.
    dispose_engines()
    from workers.tasks import start_spare

    start_spare()  # one Popen; the spare imports its framework in the background


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    """Lease -> run -> finish. A duplicate delivery returns at once."""
    from workers.tasks import run_job_now

    return run_job_now(job_id)
