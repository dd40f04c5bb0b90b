"""A gang of 2 ranks on 2 real GPUs: torch.distributed with NCCL.

Skipped unless 2 CUDA devices are visible; run on such a machine with ``pytest -m gpu``. Each
rank sees both GPUs (as a gang's ``CUDA_VISIBLE_DEVICES`` lists its members) and takes the one
at its rank. Not yet here: TensorFlow's MirroredStrategy (the TF MLP has no multi-GPU path).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.e2e.fleet import free_port
from tests.trainer_support import Trainer, launch, spec

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
