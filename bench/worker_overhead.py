"""Training throughput through the worker against the same loop run bare, in one run.

    .venv/bin/python bench/worker_overhead.py [--steps 1000] [--repeats 3]

"gpufleet": a real lease on a real Postgres, the supervisor heartbeating every second
(a tenth of the default interval), relaying progress, and recording a checkpoint every 50 steps,
around ``python -m workers.trainers.main``.
"bare": the same model, data, batch order and optimizer step in a plain PyTorch loop in a fresh
interpreter, with no checkpoints, no progress and no database.

Two figures, medians of interleaved repeats: the training loop's steps/s (timed inside each
process from the first step to the last; gpufleet's includes its progress reports, stop checks
and checkpoints) and the whole run (process start, torch import, lease and finish included).
The ratio is gpufleet/bare; the target for the training loop is at least 0.97.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.jobs import job_view, submit_job  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.domain.spec import JobSpec  # noqa: E402
from app.settings import Settings  # noqa: E402
from workers.identity import WorkerIdentity  # noqa: E402
from workers.supervisor import Outcome, Supervisor  # noqa: E402

BARE_LOOP = """
import sys, time
import torch
from app.domain.spec import JobSpec
from workers.trainers.data import load_dataset
from workers.trainers.torch_mlp import build_model, epoch_order, _batch_loss
spec = JobSpec.model_validate_json(sys.argv[1])
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
data = load_dataset(spec.model, spec.data, None)
x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
torch.manual_seed(spec.training.seed)
model = build_model(spec.model)
opt = torch.optim.Adam(model.parameters(), lr=spec.training.learning_rate)
batch, rows = spec.training.batch_size, x.shape[0]
steps_per_epoch = -(-rows // batch)
step, epoch = 0, 0
started = time.perf_counter()
while step < spec.training.max_steps:
    order = epoch_order(rows, spec.training.seed, epoch)
    for pos in range(steps_per_epoch):
        if step >= spec.training.max_steps:
            break
        idx = order[pos * batch:(pos + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss = _batch_loss(model(x[idx]), y[idx], spec.model) / idx.shape[0]
        loss.backward()
        opt.step()
        step += 1
    epoch += 1
print(time.perf_counter() - started)
"""


def job_spec(steps: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bench",
            "framework": "torch",
            "model": {"input_dim": 64, "hidden_units": [512, 512], "output_dim": 1},
            "data": {"source": "synthetic", "samples": 51200, "seed": 0},
            "training": {
                "epochs": 1000,
                "batch_size": 256,
                "learning_rate": 0.001,
                "checkpoint_every_steps": 50,
                "max_steps": steps,
            },
        }
    )


def run_bare(spec: JobSpec) -> tuple[float, float]:
    """(wall seconds, training-loop seconds)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", BARE_LOOP, spec.model_dump_json()],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - started, float(done.stdout.strip())


def run_fleet(settings: Settings, spec: JobSpec) -> tuple[float, float]:
    """(wall seconds, training-loop seconds as the trainer measured them)."""
    with session_scope(settings.database_url) as session:
        job_id = submit_job(session=session, tenant="bench", spec=spec).job_id
    identity = WorkerIdentity(worker="bench@local", device_uuid=None, cuda=False)
    started = time.perf_counter()
    outcome = Supervisor(settings, identity).run(job_id)
    elapsed = time.perf_counter() - started
    if outcome != Outcome.SUCCEEDED:
        raise SystemExit(f"the gpufleet run ended {outcome}")
    with session_scope(settings.database_url) as session:
        progress = job_view(session=session, tenant="bench", job_id=job_id)["progress"]
    loop_s = progress["step"] * spec.training.batch_size / progress["samples_per_sec"]
    return elapsed, loop_s


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
    try:
        from tests.conftest import migrate

        migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                database_url=url,
                checkpoint_root=Path(tmp) / "ckpt",
                data_root=Path(tmp) / "data",
                heartbeat_interval=1.0,
                lease_ttl=10.0,
            )
            spec = job_spec(args.steps)
            bare, fleet = [], []
            for _ in range(args.repeats):
                bare.append(run_bare(spec))
                fleet.append(run_fleet(settings, spec))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
    steps = args.steps
    bare_wall, bare_loop = (statistics.median(x) for x in zip(*bare, strict=True))
    fleet_wall, fleet_loop = (statistics.median(x) for x in zip(*fleet, strict=True))
    print(
        f"steps per run: {steps} (batch 256, MLP 64-512-512-1, CPU, 1 thread), medians of "
        f"{args.repeats}"
    )
    loop_ratio = bare_loop / fleet_loop
    print(
        f"training loop  bare {steps / bare_loop:7.1f} steps/s   gpufleet "
        f"{steps / fleet_loop:7.1f} steps/s   ratio {loop_ratio:.3f} (target >= 0.97)"
    )
    print(
        f"whole run      bare {bare_wall:6.2f} s          gpufleet {fleet_wall:6.2f} s"
        f"          ratio {bare_wall / fleet_wall:.3f} (process start, lease, finish included)"
    )


if __name__ == "__main__":
    main()
