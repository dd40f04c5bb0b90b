"""The contract between the supervisor (``workers.supervisor``) and a trainer process.

The supervisor starts ``python -m workers.trainers.main LAUNCH.json`` with:

- ``LAUNCH.json``: a :class:`Launch` (the job spec, the lease epoch, where checkpoints go,
  which checkpoints to resume from, the micro-batch to use);
- file descriptor ``GPUFLEET_CONTROL_FD`` (an env var): a pipe the trainer writes JSON lines
  to, one :data:`Message` per line. Stdout and stderr are the job's log, nothing else;
- stdin: the supervisor writes ``stop\\n`` to ask the trainer to stop at its next step
  (SIGTERM means the same; SIGKILL follows if it does not).

The trainer never touches the database: every write goes through the supervisor, which fences
it with the lease epoch. The exit code says how it ended (``EXIT_*`` below).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# How a trainer ended (the exit code); the supervisor's decision table reads them.
from app.domain.outcome import EXIT_INFRA as EXIT_INFRA
from app.domain.outcome import EXIT_OK as EXIT_OK
from app.domain.outcome import EXIT_OOM as EXIT_OOM
from app.domain.outcome import EXIT_STOPPED as EXIT_STOPPED
from app.domain.outcome import EXIT_USER_ERROR as EXIT_USER_ERROR
from app.domain.spec import JobSpec

CONTROL_FD_ENV = "GPUFLEET_CONTROL_FD"
#: a command job's launch file (``Launch``), for the SDK (``workers.sdk``).
LAUNCH_ENV = "GPUFLEET_LAUNCH"


class Launch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    epoch: int  #: the lease epoch; names checkpoint files ``e<epoch>-s<step>``
    attempt: int
    spec: JobSpec
    checkpoint_dir: Path  #: ``<checkpoint_root>/<job_id>``
    #: recorded checkpoints, newest first; the trainer loads the first that loads cleanly.
    resume_from: list[Path] = Field(default_factory=list)
    micro_batch: int  #: rows per forward/backward; accumulation = ceil(batch_size/micro_batch)
    data_root: Path
    device: Literal["cpu", "cuda"] = "cpu"
    fault_injection: bool = False
    entrypoint_prefixes: tuple[str, ...] = ()
    #: a command job's output directory (``GPUFLEET_OUTPUT_DIR``): what it leaves there is
    #: the job's artifacts.
    output_dir: Path | None = None

    def dump(self, path: Path) -> None:
        path.write_text(self.model_dump_json())

    @classmethod
    def load(cls, path: Path) -> Launch:
        return cls.model_validate_json(path.read_text())


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Progress(_Msg):
    type: Literal["progress"] = "progress"
    epoch: int
    step: int
    total_steps: int
    loss: float | None = None
    samples_per_sec: float | None = None


class CheckpointSaved(_Msg):
    """A checkpoint file was written atomically; the supervisor records it (fenced)."""

    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class CheckpointSkipped(_Msg):
    type: Literal["checkpoint_skipped"] = "checkpoint_skipped"
    path: str
    reason: str


class Resumed(_Msg):
    type: Literal["resumed"] = "resumed"
    step: int
    path: str


class Result(_Msg):
    type: Literal["result"] = "result"
    final_loss: float | None
    model_path: str
    weights_sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)


class Failure(_Msg):
    """Sent just before a non-zero exit, so the supervisor has the message, not only the code."""

    type: Literal["failure"] = "failure"
    kind: Literal["oom", "user_error", "infra"]
    message: str
    #: a GPU or driver fault (``app.domain.failures``): the supervisor marks the device suspect.
    device_suspect: bool = False


class GpuMemory(_Msg):
    """Peak memory the framework allocated (torch.cuda.max_memory_allocated), when on a GPU."""

    type: Literal["gpu_memory"] = "gpu_memory"
    peak_bytes: int


Message = Annotated[
    Progress | CheckpointSaved | CheckpointSkipped | Resumed | Result | Failure | GpuMemory,
    Field(discriminator="type"),
]
_MESSAGE = TypeAdapter[Any](Message)


def encode(message: BaseModel) -> bytes:
    return (message.model_dump_json() + "\n").encode()


def decode(line: bytes | str) -> Message:
    data = json.loads(line)
    msg: Message = _MESSAGE.validate_python(data)
    return msg
