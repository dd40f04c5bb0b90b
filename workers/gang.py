"""Running a gang (a job of ``gpu_count`` > 1): what each rank process is told.

Only the pure part so far: the supervisor does not lead gangs yet (submit still refuses them).
"""

from __future__ import annotations

from collections.abc import Sequence

#: the ranks of a gang run on one host, so they meet on the loopback interface.
MASTER_ADDR = "127.0.0.1"


def rank_environment(
    *, rank: int, devices: Sequence[str], master_port: int, real_gpus: bool
) -> dict[str, str]:
    """The variables rank ``rank`` of a gang over ``devices`` (one per rank, the leader's
    first) gets, as read by ``workers.trainers.distributed``.

    On real GPUs every rank sees all the gang's devices (``CUDA_VISIBLE_DEVICES``, by UUID) and
    picks its own by ``LOCAL_RANK``; simulated devices set no CUDA variable.
    """
    world = len(devices)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a gang of {world}")
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(master_port),
    }
    if real_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env
