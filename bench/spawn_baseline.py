"""The baseline of ``bench/tiny_jobs.py``: a Celery task that starts a fresh interpreter which
imports torch, as a queue without warm trainers would for every job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import redis
from celery import Celery

app = Celery("spawn-baseline", broker=os.environ.get("BASELINE_BROKER", "redis://127.0.0.1/0"))
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="spawn_import_torch")  # type: ignore[untyped-decorator]
def spawn_import_torch() -> None:
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    redis.Redis.from_url(app.conf.broker_url).rpush("ended", f"{time.time():.6f}")
