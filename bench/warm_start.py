"""How fast a worker starts a job, and how long its GPU sits idle between two jobs.

    .venv/bin/python bench/warm_start.py [--jobs 8]

One real worker (``gpufleet worker``, Celery prefork, one simulated GPU) on a private Redis and
a fresh Postgres database, run twice in one go: with its warm spare trainer
(``GPUFLEET_WARM_SPARE=1``, the default) and without (a cold interpreter per job). Figures:

- submit → trainer called: a job is inserted and its wake-up sent as the API does, and a
  custom entrypoint prints the moment it is called (p50 and p95);
- submit → first step of a small built-in torch job (2,000 samples), on an idle worker: the
  moment its first step reports, stamped in the job's log by a wrapper around the built-in
  trainer (progress reaches the database only with the next heartbeat) (p50);
- idle gap on a busy device: ``jobs`` jobs submitted at once; the time from one lease's release
  to the next lease's start, on the database's clock (p50 and p95).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.jobs import submit_job  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.domain.spec import JobSpec  # noqa: E402
from app.queue import Dispatcher  # noqa: E402
from app.settings import Settings  # noqa: E402

PG_ADMIN = os.environ.get("GPUFLEET_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres")

STAMP = {
    "name": "stamp",
    "entrypoint": "tests.custom_trainers.probes:stamp",
    "resources": {"gpu_type": "any", "memory_gb": 8},
}
SMALL_TORCH = {
    "name": "small",
    "framework": "torch",
    # the built-in torch trainer, stamping its first step in the log
    "entrypoint": "tests.custom_trainers.probes:first_step_stamp",
    "model": {"type": "mlp", "input_dim": 8, "hidden_units": [16], "output_dim": 1},
    "data": {"source": "synthetic", "samples": 2000, "seed": 0},
    "training": {"epochs": 1, "batch_size": 100, "checkpoint_every_steps": 100},
    "resources": {"gpu_type": "any", "memory_gb": 8},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Rig:
    """A database, a Redis and one worker process."""

    def __init__(self, tmp: Path, *, warm: bool) -> None:
        self.dbname = f"gpufleet_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN + " dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')  # type: ignore[arg-type]
        info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
        url = (
            f"postgresql+psycopg://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}"
            f":{info.get('port', 5432)}/{self.dbname}"
        )
        from tests.conftest import migrate

        migrate(url)
        redis_port = free_port()
        self.redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        self.settings = Settings(
            database_url=url,
            broker_url=f"redis://127.0.0.1:{redis_port}/0",
            checkpoint_root=tmp / "ckpt",
            data_root=tmp / "data",
            entrypoint_allow="tests.custom_trainers",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        env.update(
            {
                "GPUFLEET_DATABASE_URL": url,
                "GPUFLEET_BROKER_URL": self.settings.broker_url,
                "GPUFLEET_CHECKPOINT_ROOT": str(tmp / "ckpt"),
                "GPUFLEET_DATA_ROOT": str(tmp / "data"),
                "GPUFLEET_ENTRYPOINT_ALLOW": "tests.custom_trainers",
                "GPUFLEET_FAKE_GPUS": "A100:80",
                "GPUFLEET_HOSTNAME": f"bench-{uuid.uuid4().hex[:6]}",
                "GPUFLEET_WARM_SPARE": "1" if warm else "0",
            }
        )
        self.log = (tmp / f"worker-{warm}.log").open("wb")
        time.sleep(0.3)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.dispatcher = Dispatcher(self.settings)
        deadline = time.monotonic() + 60
        while b"ready." not in (tmp / f"worker-{warm}.log").read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not start")
            time.sleep(0.1)
        time.sleep(12.0)  # (the spare imports torch in the background)

    def submit(self, body: dict[str, Any]) -> tuple[uuid.UUID, float]:
        spec = JobSpec.model_validate(body)
        with session_scope(self.settings.database_url) as s:
            job_id = submit_job(session=s, tenant="bench", spec=spec).job_id
        self.dispatcher.dispatch(job_id=job_id, queue=spec.queue, priority=spec.priority)
        return job_id, time.time()

    def query(self, sql: str, **params: Any) -> Any:
        with session_scope(self.settings.database_url) as s:
            return s.execute(text(sql), params).all()

    def wait_final(self, job_id: uuid.UUID) -> None:
        deadline = time.monotonic() + 120
        while (
            self.query(
                "SELECT 1 FROM jobs WHERE id = :j AND status IN ('succeeded', 'failed')", j=job_id
            )
            == []
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not end")
            time.sleep(0.02)

    def close(self) -> None:
        os.killpg(self.worker.pid, 15)
        self.worker.wait(timeout=60)
        self.redis.terminate()
        self.redis.wait()
        with psycopg.connect(PG_ADMIN + " dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')  # type: ignore[arg-type]


def stamped_after(rig: Rig, job_id: uuid.UUID, submitted: float, stamp: str) -> float:
    """Seconds from submit to the moment the job printed ``stamp`` (its own clock: one host)."""
    rig.wait_final(job_id)
    time.sleep(1.2)  # (output reaches the job's log within a second)
    (row,) = rig.query(
        "SELECT string_agg(chunk, '') AS out FROM job_logs WHERE job_id = :j", j=job_id
    )
    moment = float(row.out.split(f"{stamp} ")[1].split()[0])
    return moment - submitted


def called_after(rig: Rig, job_id: uuid.UUID, submitted: float) -> float:
    return stamped_after(rig, job_id, submitted, "CALLED_AT")


def first_step_after(rig: Rig) -> float:
    """Submit → first step of the small torch job. Its progress reaches the database only with
    the next heartbeat, so the trainer stamps the moment in its log."""
    job_id, submitted = rig.submit(SMALL_TORCH)
    return stamped_after(rig, job_id, submitted, "FIRST_STEP_AT")


def idle_gaps(rig: Rig, jobs: int) -> list[float]:
    ids = [rig.submit(STAMP)[0] for _ in range(jobs)]
    for job_id in ids:
        rig.wait_final(job_id)
    rows = rig.query(
        "SELECT acquired_at, released_at FROM leases WHERE job_id = ANY(:ids) ORDER BY acquired_at",
        ids=ids,
    )
    return [
        (nxt.acquired_at - cur.released_at).total_seconds() for cur, nxt in itertools.pairwise(rows)
    ]


def measure(warm: bool, jobs: int, idle: float) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp), warm=warm)
        try:
            called = []
            for _ in range(jobs):
                job_id, submitted = rig.submit(STAMP)
                called.append(called_after(rig, job_id, submitted))
                time.sleep(idle)  # an idle fleet: the next spare has imported its framework
            first = []
            for _ in range(max(3, jobs // 2)):
                first.append(first_step_after(rig))
                time.sleep(idle)
            return {"called": called, "first_step": first, "gap": idle_gaps(rig, jobs)}
        finally:
            rig.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument(
        "--idle", type=float, default=12.0, help="seconds between jobs on the idle worker"
    )
    args = parser.parse_args()
    results = {mode: measure(mode == "warm", args.jobs, args.idle) for mode in ("cold", "warm")}
    print(f"one worker, simulated A100, {args.jobs} jobs per figure (seconds)")
    for name, label, target in (
        ("called", "submit -> trainer called", "warm p50 <= 0.300"),
        ("first_step", "submit -> first step (torch, 2k rows)", "warm p50 <= 1.0"),
        ("gap", "idle gap between two jobs", "warm p50 <= 0.100, p95 <= 0.500"),
    ):
        cold, warm = results["cold"][name], results["warm"][name]
        print(
            f"{label:40s} cold p50 {statistics.median(cold):6.3f} p95 {pct(cold, 0.95):6.3f}"
            f"   warm p50 {statistics.median(warm):6.3f} p95 {pct(warm, 0.95):6.3f}"
            f"   ratio {statistics.median(cold) / max(statistics.median(warm), 1e-9):5.1f}x"
            f"   (target {target})"
        )


if __name__ == "__main__":
    main()
