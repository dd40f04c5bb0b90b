"""The gpufleet SDK: what a command job's program uses to be resumable, report progress and
back off on out-of-memory. ``from workers import sdk``, in the worker's interpreter (``python``
in a command is that interpreter)::

    from workers import sdk

    def train(job: sdk.Job) -> dict[str, float]:
        model, opt = build(seed=job.seed)
        step = 0
        state = job.resume()                       # the newest checkpoint that loads, or None
        if state is not None:
            model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
            sdk.set_rng_state(state["rng"]); step = state["step"]
        while step < total:
            if job.should_stop():                  # the worker is stopping: save, then stop
                job.stop({"step": step, ...})
            job.check_step(step + 1)               # injected faults (drills and tests)
            ...  # job.batch_size rows per step, in job.accumulation chunks of job.micro_batch
            step += 1
            if step % every == 0:
                job.save({"step": step, "model": ..., "optimizer": ..., "rng": sdk.rng_state()})
            job.progress(step, total, loss=loss)
        torch.save(model.state_dict(), job.output_dir / "model.pt")   # an artifact
        return {"final_loss": loss}

    sdk.run(train)

:func:`run` ends the process the way the built-in trainers end (``workers.trainers.main``):
exit 0 with a result, or a failure message and the exit code of its class; a framework's
out-of-memory error makes the worker start it again with half the micro-batch and twice the
accumulation. Checkpoints are ``torch.save`` files loaded with ``weights_only=True`` (tensors,
numbers, strings and containers of them) with an int ``step``; they are written on a background
thread and recorded once durable. A program that never imports the SDK still runs; it reads
the same ``GPUFLEET_*`` variables (``workers.command_job``) but is not resumable.

In a job of several GPUs the program runs once per GPU with torch.distributed's variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): :attr:`Job.rank`,
:attr:`Job.world_size` and :attr:`Job.device` say where this rank stands; only rank 0's
messages are recorded and only rank 0's :meth:`Job.save` writes (``tests/commands/ddp_train.py``).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from workers.trainers.context import TrainContext
from workers.trainers.control import ControlChannel, StopFlag
from workers.trainers.errors import StopRequested
from workers.trainers.lifeline import bind_to_supervisor
from workers.trainers.main import execute
from workers.trainers.protocol import LAUNCH_ENV, Launch
from workers.trainers.ranks import Ranks

__all__ = ["Job", "StopRequested", "connect", "rng_state", "run", "set_rng_state"]


class Job:
    """The running job as its program sees it."""

    def __init__(self, ctx: TrainContext, channel: ControlChannel, stop: StopFlag) -> None:
        self.ctx = ctx
        self.channel = channel
        self.stop_flag = stop
        #: this process's place in a job of several GPUs (``workers.gang`` sets the variables)
        self.ranks = Ranks.from_env()

    @property
    def job_id(self) -> str:
        return self.ctx.job_id

    @property
    def batch_size(self) -> int:
        """Rows per optimizer step (the effective batch); never changes for a job."""
        return self.ctx.batch_size

    @property
    def micro_batch(self) -> int:
        """Rows per forward/backward pass; halved after out-of-memory."""
        return self.ctx.micro_batch

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimizer step."""
        return self.ctx.accumulation

    @property
    def seed(self) -> int:
        return self.ctx.spec.training.seed

    @property
    def checkpoint_every_steps(self) -> int:
        return self.ctx.spec.training.checkpoint_every_steps

    @property
    def rank(self) -> int:
        """This process's rank in a job of several GPUs (``RANK``); 0 in a job of one."""
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        """How many ranks the job runs (``WORLD_SIZE``: its ``gpu_count``)."""
        return self.ranks.world

    @property
    def device(self) -> str:
        """``"cpu"``, ``"cuda"`` (the one GPU the worker gives the job) or, in a job of several
        GPUs, ``"cuda:N"``: this rank's GPU among the gang's (``LOCAL_RANK``)."""
        if self.ctx.device == "cuda" and self.ranks.world > 1:
            return f"cuda:{self.ranks.rank}"
        return self.ctx.device

    @property
    def output_dir(self) -> Path:
        """What the job leaves here are its artifacts."""
        out = self.ctx.launch.output_dir
        return out if out is not None else Path.cwd()

    def resume(self) -> dict[str, Any] | None:
        """The newest recorded checkpoint that loads (a broken one is skipped), or None."""
        return self.ctx.load_checkpoint()

    def save(self, state: Mapping[str, Any]) -> Path:
        """Save a checkpoint (with an int ``step``); recorded by the worker once durable. In a
        job of several GPUs only rank 0 writes (data-parallel ranks hold the same state); on
        the others this only notes the step, and every rank resumes from rank 0's file."""
        if self.ranks.leader:
            return self.ctx.save_checkpoint(state)
        step = int(state["step"])
        self.ctx.last_saved_step = step
        return self.ctx.checkpoint_path(step)

    def progress(
        self, step: int, total_steps: int, *, loss: float | None = None, epoch: int = 1
    ) -> None:
        """Progress after optimizer step ``step`` (throttled; the last step always goes)."""
        self.ctx.report(step, total_steps, epoch=epoch, loss=loss)

    def should_stop(self) -> bool:
        """True once the worker asked the job to stop (drain, cancel): call :meth:`stop`."""
        return self.ctx.should_stop()

    def stop(self, state: Mapping[str, Any]) -> NoReturn:
        """Save ``state`` and stop; the job goes on from it, here or on another worker."""
        if self.ctx.last_saved_step != int(state["step"]):
            self.save(state)
        raise StopRequested

    def check_step(self, step: int) -> None:
        """Injected faults for step ``step`` (1-based); a no-op unless the job and the worker
        allow fault injection."""
        self.ctx.faults.check_step(step, self.micro_batch)


def connect() -> Job:
    """The job this process runs (from ``GPUFLEET_LAUNCH`` and the control pipe)."""
    raw = os.environ.get(LAUNCH_ENV)
    if not raw:
        raise RuntimeError(f"{LAUNCH_ENV} is not set: run this program as a gpufleet command job")
    bind_to_supervisor()
    channel = ControlChannel.from_env()
    stop = StopFlag()
    stop.install()
    launch = Launch.load(Path(raw))
    return Job(TrainContext(launch, channel, stop), channel, stop)


def run(train: Callable[[Job], Mapping[str, Any] | None]) -> NoReturn:
    """Run ``train(job)`` and exit the way the worker understands (see the module)."""
    job = connect()

    def body() -> dict[str, Any]:
        outcome = dict(train(job) or {})
        outcome.setdefault("final_loss", None)
        outcome.setdefault("model_path", str(job.output_dir))
        outcome.setdefault("weights_sha256", "")
        return outcome

    sys.stdout.flush()
    sys.exit(execute(job.ctx, job.channel, job.stop_flag, body))


def rng_state() -> dict[str, Any]:
    """Python's and torch's random states, to put in a checkpoint (a bit-for-bit resume)."""
    import torch

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
