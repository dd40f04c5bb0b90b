"""Tiny jobs per minute on two workers, against a Celery pair that spawns ``import torch``.

    .venv/bin/python bench/tiny_jobs.py [--jobs 30]

"gpufleet": two real workers (``gpufleet worker``, one simulated GPU each, warm spares on, the
defaults otherwise) on an embedded PostgreSQL and Redis; ``jobs`` tiny jobs (a custom
entrypoint that returns at once) submitted together through the API; jobs per minute from the
first submit to the last job's end.

"baseline": the same two-process Celery shape with nothing of gpufleet: a task that starts
``python -c "import torch"`` and waits for it, ``jobs`` tasks sent together to two
``celery worker --concurrency 1`` processes on the same Redis; tasks per minute from the first
send to the last task's end.

The ratio is gpufleet/baseline (target at least 1.0). Both run in one go, one after the other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.db.session import session_scope  # noqa: E402
from app.embedded import EmbeddedRedis  # noqa: E402
from bench.rig import private_fleet  # noqa: E402
from tests.e2e.fleet import wait_for  # noqa: E402

TINY = {
    "name": "tiny",
    "entrypoint": "tests.custom_trainers.probes:stamp",
    "resources": {"gpu_type": "any", "memory_gb": 8},
    "max_attempts": 1,
}
BASELINE_APP = "bench.spawn_baseline"


def gpufleet(jobs: int, tmp: Path) -> float:
    with private_fleet(tmp) as (fleet, db_url):
        fleet.start_api()
        for i in range(2):
            fleet.start_worker(f"worker-{i}", fake_gpus="A100:80,A100:80", host="tiny")
        fleet.wait_workers_ready(2, timeout=120)
        time.sleep(15.0)  # both spares have imported torch
        started = time.time()
        ids = [fleet.submit(TINY) for _ in range(jobs)]
        final = fleet.wait_final(ids, timeout=900)
        failed = [j for j, f in final.items() if f["status"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} tiny jobs did not succeed")
        with session_scope(db_url) as s:
            ended = s.scalar(text("SELECT extract(epoch FROM max(finished_at)) FROM jobs"))
            held, gap = s.execute(
                text(
                    """
                    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                               released_at - acquired_at)) AS held,
                           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                               acquired_at - prev)) AS gap
                      FROM (SELECT acquired_at, released_at, lag(released_at) OVER (
                                   PARTITION BY device_uuid ORDER BY acquired_at) AS prev
                              FROM leases) l
                    """
                )
            ).one()
        print(f"gpufleet: a job holds its lease {held:.2f} s (p50), then {gap:.3f} s to the next")
        return jobs / ((float(ended) - started) / 60)


def baseline(jobs: int, tmp: Path) -> float:
    with EmbeddedRedis(tmp / "redis-baseline", durable=False).start() as broker:
        url = broker.url()
        env = {**os.environ, "BASELINE_BROKER": url, "PYTHONPATH": str(ROOT)}
        logs = [(tmp / f"celery-{i}.log").open("wb") for i in range(2)]
        workers = [
            subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", BASELINE_APP, "worker",
                    "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"base{i}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "--loglevel", "INFO",
                ],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            for i, log in enumerate(logs)
        ]  # fmt: skip
        try:
            wait_for(
                lambda: all(b"ready." in (tmp / f"celery-{i}.log").read_bytes() for i in range(2)),
                timeout=120,
                what="the baseline workers",
            )
            from bench.spawn_baseline import app, spawn_import_torch

            app.conf.broker_url = url
            client = redis.Redis.from_url(url)
            started = time.time()
            for _ in range(jobs):
                spawn_import_torch.delay()
            wait_for(lambda: client.llen("ended") >= jobs, timeout=900, interval=0.05)
            ended = max(float(v) for v in client.lrange("ended", 0, -1))
            return jobs / ((ended - started) / 60)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpufleet-tiny-") as tmp:
        ours = gpufleet(args.jobs, Path(tmp))
        print(f"gpufleet: {ours:.1f} jobs/min", flush=True)
        base = baseline(args.jobs, Path(tmp))
    print(f"{args.jobs} tiny jobs on two workers (jobs per minute)")
    print(f"gpufleet (warm spares)                 {ours:8.1f}")
    print(f"Celery pair spawning `import torch`    {base:8.1f}")
    print(f"ratio                                  {ours / base:8.2f}   (target >= 1.0)")


if __name__ == "__main__":
    main()
