"""``TrainContext``: the one object every trainer gets, built-in or custom. The custom-trainer API.

A custom trainer is a function named in the spec as ``entrypoint: "package.module:function"``
(its module must be under one of the worker's ``GPUFLEET_ENTRYPOINT_ALLOW`` prefixes). It runs
in its own process, takes a ``TrainContext`` and returns a dict with at least ``final_loss``
(a float or None), ``model_path`` and ``weights_sha256`` (and optionally ``metrics``, a dict of
floats)::

    def train(ctx: TrainContext) -> dict[str, object]:
        model, opt = build(ctx.spec, seed=ctx.spec.training.seed)
        state = ctx.load_checkpoint()            # newest checkpoint that loads, or None
        step = 0
        if state is not None:
            model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
            step = state["step"]
        while step < total:
            if ctx.should_stop():                # stop asked: checkpoint, then stop
                ctx.save_checkpoint({"step": step, "model": ..., "optimizer": ...})
                raise StopRequested
            ctx.faults.check_step(step + 1, ctx.micro_batch)
            ...  # one optimizer step over ctx.batch_size rows, in chunks of ctx.micro_batch
            step += 1
            if step % ctx.spec.training.checkpoint_every_steps == 0:
                ctx.save_checkpoint({"step": step, ...})
            ctx.report(step, total, epoch=1, loss=loss)
            ctx.faults.after_step()
        return {"final_loss": loss, "model_path": str(path), "weights_sha256": digest}

Checkpoints are ``torch.save`` files loaded with ``weights_only=True``: tensors, numbers,
strings, and lists/tuples/dicts of them. The state must have an int ``step``. Frameworks with
their own format use :meth:`TrainContext.save_checkpoint_dir` / :meth:`load_checkpoint_dir`.

Exceptions: raise :class:`~workers.trainers.errors.StopRequested` after the stop checkpoint,
:class:`~workers.trainers.errors.UserError` for a bad spec or data; an out-of-memory error from
the framework makes the supervisor retry with half the micro-batch (``ctx.micro_batch``) and
twice the accumulation (``ctx.accumulation``), so keep the effective batch ``ctx.batch_size``.

The trainer never deletes checkpoints: the supervisor keeps the last N it recorded.
This module imports no framework; torch is imported only when a torch checkpoint is written or
read.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, overload

from app.domain.retry import accumulation_for
from app.domain.spec import JobSpec
from workers.trainers import checkpoints
from workers.trainers.control import Channel, StopFlag
from workers.trainers.faults import Faults
from workers.trainers.protocol import (
    CheckpointSaved,
    CheckpointSkipped,
    GpuMemory,
    Launch,
    Progress,
    Resumed,
)

T = TypeVar("T")

REPORT_INTERVAL_S = 0.5  #: at most two progress messages a second (the last one always goes)
LOG_INTERVAL_S = 10.0  #: a progress line in the job's log at most this often


class TrainContext:
    def __init__(
        self,
        launch: Launch,
        channel: Channel,
        stop: StopFlag | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.launch = launch
        self._channel = channel
        self._stop = stop or StopFlag()
        self._clock = clock
        self.faults = Faults.for_launch(launch)
        self._pending: Progress | None = None
        self._last_sent = float("-inf")
        self._last_logged = float("-inf")
        self.last_saved_step: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[None] | None = None

    # -- what the trainer needs to know ---------------------------------------------------

    @property
    def spec(self) -> JobSpec:
        return self.launch.spec

    @property
    def job_id(self) -> str:
        return self.launch.job_id

    @property
    def epoch(self) -> int:
        """The lease epoch (names checkpoint files), not a training epoch."""
        return self.launch.epoch

    @property
    def attempt(self) -> int:
        return self.launch.attempt

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"`` (the one GPU the worker exposes)."""
        return self.launch.device

    @property
    def batch_size(self) -> int:
        """Rows per optimizer step (the effective batch); never changes for a job."""
        return self.spec.training.batch_size

    @property
    def micro_batch(self) -> int:
        """Rows per forward/backward pass; halved by the supervisor after out-of-memory."""
        return min(self.launch.micro_batch, self.batch_size)

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimizer step."""
        return accumulation_for(self.batch_size, self.micro_batch)

    @property
    def checkpoint_dir(self) -> Path:
        return self.launch.checkpoint_dir

    @property
    def data_root(self) -> Path:
        return self.launch.data_root

    def should_stop(self) -> bool:
        """True once the supervisor asked to stop: save a checkpoint and raise StopRequested."""
        return self._stop.is_set()

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint_path(self, step: int, suffix: str = ".pt") -> Path:
        return self.checkpoint_dir / checkpoints.checkpoint_name(self.epoch, step, suffix)

    def save_checkpoint(self, state: Mapping[str, Any]) -> Path:
        """Write ``state`` (with an int ``step``) with ``torch.save``, atomically; record it.

        The state is copied at once (tensors cloned to the CPU), then written and fsynced on a
        background thread while training goes on: the write costs the training loop about
        nothing instead of ~5 % at a checkpoint every 50 small steps (``bench/``). It is
        recorded only once durable; at most one write is in flight, and its error surfaces at
        the next save or at :meth:`wait_checkpoints`.
        """
        step = int(state["step"])
        snapshot = _snapshot(state)
        path = self.checkpoint_path(step)

        def write(fileobj: BinaryIO) -> None:
            import torch

            torch.save(snapshot, fileobj)

        def write_and_record() -> None:
            checkpoints.atomic_write_file(path, write)
            self._saved(step, path)

        self.wait_checkpoints()
        self._inflight = self._writer().submit(write_and_record)
        self.last_saved_step = step
        return path

    def save_checkpoint_dir(self, step: int, write: Callable[[Path], None]) -> Path:
        """Save a checkpoint in a format of its own: ``write(dir)`` fills a fresh directory.
        Written synchronously: the framework's writer reads live state."""
        self.wait_checkpoints()
        path = checkpoints.atomic_write_dir(self.checkpoint_path(step, suffix=""), write)
        self._saved(step, path)
        self.last_saved_step = step
        return path

    def wait_checkpoints(self) -> None:
        """Block until the checkpoint being written is durable and recorded; re-raise its error."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        return self._executor

    def _saved(self, step: int, path: Path) -> None:
        self._channel.send(CheckpointSaved(step=step, path=str(path)))
        self.log(f"checkpoint step {step}: {path}")

    @overload
    def load_checkpoint(self) -> dict[str, Any] | None: ...

    @overload
    def load_checkpoint(self, restore: Callable[[dict[str, Any]], T]) -> T | None: ...

    def load_checkpoint(self, restore: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        """The newest of ``launch.resume_from`` that loads, through ``restore`` if given.

        A checkpoint that fails to load, or whose ``restore(state)`` raises (say a state that
        does not fit the model), is skipped for the one before it, with a ``checkpoint_skipped``
        message saying why. Returns None when none is left (start from scratch).
        """

        def read(path: Path) -> tuple[int, Any]:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("not a checkpoint: no int 'step'")
            return state["step"], restore(state) if restore is not None else state

        return self._load_first(read)

    def load_checkpoint_dir(self, restore: Callable[[Path], T]) -> T | None:
        """Like :meth:`load_checkpoint` for checkpoints saved with :meth:`save_checkpoint_dir`."""

        def read(path: Path) -> tuple[int, T]:
            step = checkpoints.parse_step(path)
            if step is None:
                raise ValueError(f"not a checkpoint name: {path.name}")
            if not path.is_dir():
                raise FileNotFoundError(f"no checkpoint directory at {path}")
            return step, restore(path)

        return self._load_first(read)

    def _load_first(self, read: Callable[[Path], tuple[int, T]]) -> T | None:
        for path in self.launch.resume_from:
            try:
                step, loaded = read(path)
            except Exception as exc:  # any failure: try the checkpoint before it
                reason = f"{type(exc).__name__}: {exc}"[:1000]
                self._channel.send(CheckpointSkipped(path=str(path), reason=reason))
                self.log(f"checkpoint skipped: {path}: {reason}")
                continue
            self._channel.send(Resumed(step=step, path=str(path)))
            self.last_saved_step = step
            self.log(f"resumed from step {step}: {path}")
            return loaded
        return None

    # -- progress -------------------------------------------------------------------------

    def report(
        self,
        step: int,
        total_steps: int,
        epoch: int,
        loss: float | None = None,
        samples_per_sec: float | None = None,
    ) -> None:
        """Progress after optimizer step ``step`` of ``total_steps`` in training epoch
        ``epoch`` (1-based). Throttled to two messages a second; the final step always goes,
        and :meth:`flush` sends the last one held back."""
        self._pending = Progress(
            epoch=epoch,
            step=step,
            total_steps=total_steps,
            loss=loss,
            samples_per_sec=samples_per_sec,
        )
        now = self._clock()
        if step >= total_steps or now - self._last_sent >= REPORT_INTERVAL_S:
            self.flush()
        if step >= total_steps or now - self._last_logged >= LOG_INTERVAL_S:
            self._last_logged = now
            speed = f", {samples_per_sec:.0f} samples/s" if samples_per_sec else ""
            shown = f"{loss:.6g}" if loss is not None else "-"
            self.log(f"step {step}/{total_steps} epoch {epoch} loss {shown}{speed}")

    def flush(self) -> None:
        if self._pending is not None:
            self._channel.send(self._pending)
            self._pending = None
            self._last_sent = self._clock()

    def report_gpu_memory(self, peak_bytes: int) -> None:
        self._channel.send(GpuMemory(peak_bytes=peak_bytes))

    def log(self, line: str) -> None:
        """A line in the job's log (stdout)."""
        print(f"[{self.job_id} e{self.epoch}] {line}", flush=True)


def _snapshot(value: Any) -> Any:
    """A copy of a checkpoint state that later training steps cannot change: tensors cloned to
    the CPU, containers rebuilt, everything else (numbers, strings) shared."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(item) for item in value)
    return value
