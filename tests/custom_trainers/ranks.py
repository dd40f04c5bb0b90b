"""Trainers for gangs (``gpu_count`` > 1) that misbehave on one rank."""

from __future__ import annotations

import os
import time
from typing import Any

from workers.trainers.context import TrainContext
from workers.trainers.errors import StopRequested


def fail_on_rank_1(ctx: TrainContext) -> dict[str, Any]:
    """Rank 1 fails with a user error after a moment; every other rank would run for minutes
    (as a rank waiting for its peer in an all-reduce would), stopping only when asked."""
    rank = int(os.environ.get("RANK", "0"))
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE')} pid {os.getpid()}", flush=True)
    if rank == 1:
        time.sleep(0.5)
        raise ValueError("rank 1 found a bad row")
    for _ in range(3000):
        if ctx.should_stop():
            raise StopRequested
        time.sleep(0.1)
    return {"final_loss": None, "model_path": "", "weights_sha256": ""}
