"""Training throughput with checkpoints going to an object store against local disk, in one run.

    .venv/bin/python bench/checkpoint_store.py [--steps 1000] [--repeats 3]

Both sides run the same job through the real worker path (a real lease on a real Postgres, the
supervisor heartbeating, relaying progress, and syncing a checkpoint every 50 steps around
``python -m workers.trainers.main``), interleaved:

- "local": ``GPUFLEET_STORAGE_URL`` blank: each checkpoint is hashed and recorded, and stays on
  the worker's disk;
- "object store": ``GPUFLEET_STORAGE_URL=s3://...`` on moto's S3 server (a process of its own
  on this machine): each checkpoint is hashed, uploaded by the supervisor, and recorded once
  the upload is complete.

The figure is the training loop's steps/s (timed inside the trainer from the first step to the
last), medians of the repeats; the ratio is object store / local, the target at least 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402
from bench.worker_overhead import job_spec, run_fleet  # noqa: E402
from tests.s3_server import s3_client, start_moto  # noqa: E402

BUCKET = "gpufleet-bench"


def objects(client: object) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)  # type: ignore[attr-defined]
    return sum(1 for page in pages for o in page.get("Contents", []) if "/checkpoints/" in o["Key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dbname = f"gpufleet_bench_{uuid.uuid4().hex[:8]}"
    admin = "host=127.0.0.1 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')  # type: ignore[arg-type]
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
    moto, endpoint = start_moto()
    try:
        from tests.conftest import migrate

        migrate(url)
        s3 = s3_client(endpoint, key="bench")
        s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            local = Settings(
                database_url=url,
                checkpoint_root=Path(tmp) / "ckpt",
                data_root=Path(tmp) / "data",
                storage_root=Path(tmp) / "storage",
                heartbeat_interval=1.0,
                lease_ttl=10.0,
                checkpoints_keep=3,
            )
            remote = local.model_copy(
                update={
                    "storage_url": f"s3://{BUCKET}/bench",
                    "s3_endpoint_url": endpoint,
                    "s3_region": "us-east-1",
                    "s3_access_key_id": "bench",
                    "s3_secret_access_key": SecretStr("bench"),
                }
            )
            spec = job_spec(args.steps)
            runs: dict[str, list[float]] = {"local": [], "object store": []}
            for _ in range(args.repeats):
                runs["local"].append(run_fleet(local, spec)[1])
                runs["object store"].append(run_fleet(remote, spec)[1])
            kept = objects(s3)
    finally:
        moto.terminate()
        moto.wait(10)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
    steps = args.steps
    local_s = statistics.median(runs["local"])
    remote_s = statistics.median(runs["object store"])
    print(
        f"steps per run: {steps} (batch 256, MLP 64-512-512-1, CPU, 1 thread), a checkpoint "
        f"every 50 steps, medians of {args.repeats}; {kept} checkpoint objects left in the "
        f"bucket (the last 3 of each run)"
    )
    print(
        f"training loop  local {steps / local_s:7.1f} steps/s   object store "
        f"{steps / remote_s:7.1f} steps/s   ratio {local_s / remote_s:.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
