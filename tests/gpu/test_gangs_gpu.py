"""A gang of 2 ranks on 2 real GPUs: torch.distributed with NCCL, as 2 bare trainer ranks and
as a gang the supervisor leads (lease, ranks with ``CUDA_VISIBLE_DEVICES`` set to both UUIDs,
result).

Skipped unless 2 CUDA devices are visible; run on such a machine with ``pytest -m gpu``. Each
rank sees both GPUs (as a gang's ``CUDA_VISIBLE_DEVICES`` lists its members) and takes the one
at its rank. TensorFlow's gang (one process, MirroredStrategy): ``test_tf_mirrored_gpu.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.db import devices as device_rows
from app.db.jobs import job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.e2e.fleet import free_port
from tests.trainer_support import Trainer, launch, spec
from workers.claim import as_record
from workers.devices import discover_nvml
from workers.identity import WorkerIdentity
from workers.supervisor import Outcome, Supervisor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_two_ranks_train_with_nccl_on_two_gpus_and_agree(tmp_path: Path) -> None:
    job = spec(
        model={"input_dim": 256, "hidden_units": [1024], "output_dim": 1},
        data={"samples": 16384},
        training={"batch_size": 512, "epochs": 2, "checkpoint_every_steps": 16},
    )
    port = str(free_port())
    trainers = [
        Trainer(
            launch(tmp_path, job).model_copy(update={"device": "cuda"}),
            tmp_path / f"rank{rank}",
            env={
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda t: t.collect(timeout=300), trainers))
    for o in outcomes:
        assert o.code == 0, o.stderr
    # Both ranks end with the same weights; rank 0 alone wrote the checkpoints
    assert outcomes[0].result.weights_sha256 == outcomes[1].result.weights_sha256
    assert outcomes[0].checkpoints and not outcomes[1].checkpoints
    assert "cuda:1" in outcomes[1].stdout + outcomes[1].stderr + str(outcomes[1].messages)


def test_the_supervisor_leads_a_gang_of_two_real_gpus(settings: Settings) -> None:
    # Given this host's first 2 GPUs registered and claimed, each by its own worker
    devices = discover_nvml()[:2]
    host = settings.model_copy(update={"hostname": "gpu-gang-host"})
    workers = [f"{d.gpu_type}-{d.index}@gpu-gang-host" for d in devices]
    with session_scope(host.database_url) as s:
        device_rows.register_devices(
            session=s, devices=[as_record(d, "gpu-gang-host") for d in devices]
        )
        for device, worker in zip(devices, workers, strict=True):
            assert device_rows.claim_device(session=s, uuids=[device.uuid], worker=worker, ttl=600)
    job_spec = JobSpec.model_validate(
        {
            "framework": "torch",
            "model": {"input_dim": 256, "hidden_units": [1024], "output_dim": 1},
            "data": {"samples": 16384},
            "training": {"batch_size": 512, "epochs": 1, "checkpoint_every_steps": 16},
            "resources": {"gpu_type": devices[0].gpu_type, "gpu_count": 2, "memory_gb": 8},
        }
    )
    with session_scope(host.database_url) as s:
        job_id = submit_job(session=s, tenant="t", spec=job_spec).job_id
    # When the first GPU's worker leads it
    leader = WorkerIdentity(worker=workers[0], device_uuid=devices[0].uuid, cuda=True)
    assert Supervisor(host, leader).run(job_id) == Outcome.SUCCEEDED
    # Then both ranks trained on CUDA (NCCL) and the job has its result
    with session_scope(host.database_url) as s:
        job = job_view(session=s, tenant="t", job_id=job_id)
    assert job["status"] == "succeeded" and len(job["result"]["weights_sha256"]) == 64
