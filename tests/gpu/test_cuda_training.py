"""Real CUDA: a training job on the GPU, and a real out-of-memory recovered by the backoff.

Skipped where no CUDA device is visible; run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sqlalchemy import text

from app.db.jobs import job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from workers.identity import WorkerIdentity
from workers.supervisor import Outcome, Supervisor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
]

GPU = WorkerIdentity(worker="gpu-test@local", device_uuid=None, cuda=True)


def _run(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    spec = JobSpec.model_validate(body)
    with session_scope(settings.database_url) as s:
        job_id = submit_job(session=s, tenant="t", spec=spec).job_id
    outcome = Supervisor(settings, GPU).run(job_id)
    with session_scope(settings.database_url) as s:
        view = job_view(session=s, tenant="t", job_id=job_id)
        view["events"] = s.scalars(
            text("SELECT message FROM job_events WHERE job_id = :j AND kind = 'oom_backoff'"),
            {"j": job_id},
        ).all()
    view["outcome"] = outcome
    return view


def test_a_job_trains_on_the_gpu_with_mixed_precision(settings: Settings) -> None:
    job = _run(
        settings,
        {
            "framework": "torch",
            "model": {"input_dim": 256, "hidden_units": [1024, 1024], "output_dim": 1},
            "data": {"samples": 65536},
            "training": {
                "epochs": 2,
                "batch_size": 1024,
                "mixed_precision": True,
                "checkpoint_every_steps": 32,
            },
        },
    )
    assert job["outcome"] == Outcome.SUCCEEDED, job["error"]
    assert job["gpu"]["peak_memory_gb"] > 0


def test_a_batch_far_too_large_for_the_card_is_recovered_by_the_backoff(
    settings: Settings,
) -> None:
    # One optimizer step over 2**20 rows of a 32768-wide layer: ~128 GiB of activations at
    # micro-batch 2**20, more than any card has; the backoff halves until it fits.
    job = _run(
        settings,
        {
            "framework": "torch",
            "model": {"input_dim": 64, "hidden_units": [32768], "output_dim": 1},
            "data": {"samples": 2**20},
            "training": {"epochs": 1, "batch_size": 2**20, "checkpoint_every_steps": 1},
        },
    )
    assert job["outcome"] == Outcome.SUCCEEDED, job["error"]
    assert job["events"], "at least one real out-of-memory backoff"
    assert job["batch"]["micro_batch"] < 2**20
    assert job["batch"]["micro_batch"] * job["batch"]["accumulation"] >= 2**20
