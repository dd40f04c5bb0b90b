"""The ranks of a gang (``gpu_count`` > 1) as a trainer sees them: torch.distributed's standard
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), set by whoever starts
the ranks. Without ``WORLD_SIZE`` (or with 1) a trainer is the only rank and nothing here runs.

Backend: ``gloo`` on the CPU, ``nccl`` on CUDA. Each rank sees only its own GPU as ``cuda``
(``CUDA_VISIBLE_DEVICES`` lists the gang's UUIDs; the rank uses the one at its index).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from workers.trainers.ranks import Ranks

__all__ = ["Ranks", "any_rank", "shard", "start", "stop", "total"]

#: how long a rank waits for the others at the rendezvous (then it fails: infra).
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (a no-op for a single rank); returns this rank's device."""
    if ranks.world == 1:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(ranks.rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=RENDEZVOUS_TIMEOUT,
    )
    return device


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous part of a batch's rows (sizes differ by at most one)."""
    if ranks.world == 1:
        return rows
    return rows.tensor_split(ranks.world)[ranks.rank]


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks stop at the same step, or the others
    would wait for ever in the next all-reduce."""
    if ranks.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def total(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of ``value`` over the ranks (in place; the same on every rank)."""
    if ranks.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
