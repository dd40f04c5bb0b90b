"""A process's place in a gang (``gpu_count`` > 1), from torch.distributed's standard
variables (``RANK``, ``WORLD_SIZE``) that ``workers.gang`` sets; without them a process is the
only rank. No framework import: the SDK reads it in any command job."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @property
    def leader(self) -> bool:
        """Rank 0 writes checkpoints and the final model."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not below WORLD_SIZE {world}")
        return cls(rank=rank, world=world)
