"""Who a worker process works for: the one module that names the variables carrying it.

``gpufleet worker`` claims a GPU, then :func:`export` puts the worker's identity into the
environment before Celery forks its pool; the task reads it back with :func:`current`. Nothing
else spells these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_WORKER = "GPUFLEET_WORKER_NAME"
_DEVICE = "GPUFLEET_DEVICE_UUID"
_CUDA = "GPUFLEET_DEVICE_CUDA"
_DRAIN_FILE = "GPUFLEET_DRAIN_FILE"
_HANDOFF_DIR = "GPUFLEET_HANDOFF_DIR"

#: the variables of this module: never passed on to a trainer.
NAMES = frozenset({_WORKER, _DEVICE, _CUDA, _DRAIN_FILE, _HANDOFF_DIR})


@dataclass(frozen=True)
class WorkerIdentity:
    worker: str
    device_uuid: str | None
    cuda: bool  #: a real GPU (False: simulated device, the trainer runs on the CPU)
    #: the file whose existence means "this worker is shutting down" (see ``workers.drain``).
    drain_file: Path | None = None
    #: the directory the keeper, the telemetry thread and the supervisor share
    #: (``workers.handoff``): the device claim and the GPU sample ride on the lease heartbeat.
    handoff_dir: Path | None = None


def export(identity: WorkerIdentity) -> None:
    """Make ``identity`` what this process and the pool children it forks see."""
    os.environ[_WORKER] = identity.worker
    if identity.device_uuid is None:
        os.environ.pop(_DEVICE, None)
    else:
        os.environ[_DEVICE] = identity.device_uuid
    os.environ[_CUDA] = "1" if identity.cuda else "0"
    if identity.drain_file is None:
        os.environ.pop(_DRAIN_FILE, None)
    else:
        os.environ[_DRAIN_FILE] = str(identity.drain_file)
    if identity.handoff_dir is None:
        os.environ.pop(_HANDOFF_DIR, None)
    else:
        os.environ[_HANDOFF_DIR] = str(identity.handoff_dir)


def current() -> WorkerIdentity:
    """The identity ``gpufleet worker`` exported (a bare default outside a worker)."""
    drain_file = os.environ.get(_DRAIN_FILE)
    handoff_dir = os.environ.get(_HANDOFF_DIR)
    return WorkerIdentity(
        worker=os.environ.get(_WORKER, f"worker@{os.uname().nodename}"),
        device_uuid=os.environ.get(_DEVICE),
        cuda=os.environ.get(_CUDA, "0") == "1",
        drain_file=Path(drain_file) if drain_file else None,
        handoff_dir=Path(handoff_dir) if handoff_dir else None,
    )
