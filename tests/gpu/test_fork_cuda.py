"""Real CUDA on the fork path: a trainer forked from the zygote creates its own CUDA context
and trains, and the zygote never loads the CUDA driver (a context does not survive ``fork``).

Skipped where no CUDA device is visible; run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.db.jobs import job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from workers.identity import WorkerIdentity
from workers.supervisor import Outcome, Supervisor
from workers.warm_spare import WarmSpare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
]

GPU = WorkerIdentity(worker="gpu-fork-test@local", device_uuid=None, cuda=True)
JOB = {
    "framework": "torch",
    "model": {"input_dim": 64, "hidden_units": [256], "output_dim": 1},
    "data": {"samples": 4096},
    "training": {"epochs": 2, "batch_size": 256, "checkpoint_every_steps": 8},
}


def cuda_driver_loaded(pid: int) -> bool:
    return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def forking() -> Iterator[WarmSpare]:
    spare = WarmSpare("fork")
    assert spare.zygote is not None
    spare.zygote.start()
    assert spare.zygote.wait_ready(120)
    spare.start("torch")
    yield spare
    spare.discard()
    spare.zygote.stop()


def test_a_forked_trainer_creates_its_cuda_context_and_trains(
    settings: Settings, forking: WarmSpare
) -> None:
    zygote, spare = forking.zygote, forking.trainer
    assert zygote is not None and zygote.pid is not None and spare is not None
    # Given a forked spare that has created its CUDA context ahead of its job
    deadline = time.monotonic() + 60
    while not cuda_driver_loaded(spare.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cuda_driver_loaded(spare.pid)
    # while the zygote it was forked from never loaded the driver
    assert not cuda_driver_loaded(zygote.pid)
    # When two jobs run, one after the other, each in a forked trainer
    for _ in range(2):
        with session_scope(settings.database_url) as s:
            job_id = submit_job(session=s, tenant="t", spec=JobSpec.model_validate(JOB)).job_id
        assert Supervisor(settings, GPU, spare=forking).run(job_id) == Outcome.SUCCEEDED
        with session_scope(settings.database_url) as s:
            view = job_view(session=s, tenant="t", job_id=job_id)
        # Then each trained on the GPU
        assert view["gpu"]["peak_memory_gb"] > 0, view
    assert not cuda_driver_loaded(zygote.pid)
