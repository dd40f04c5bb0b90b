"""The parts the supervisor's loop ticks while a trainer runs, each with its own constants.

- :class:`Heartbeat` renews the lease, and through it learns of a cancel or a lost GPU claim;
- :class:`CancelWakeup` hears a cancel announced on Redis and makes the heartbeat due now;
- :class:`DrainCheck` notices that the worker is shutting down;
- :class:`RuntimeLimit` notices that the attempt ran past the job's ``max_runtime``;
- :class:`StopEscalation` stops the trainer: ask, then SIGTERM, then SIGKILL (the group);
- :class:`OutputShipper` ships the trainer's output to the job's log in bounded chunks;
- :class:`Relay` turns the trainer's messages into fenced writes.

None of them decides how the run ends: they report stop reasons (``app.domain.stopping``) and
facts, and the supervisor decides once, at the end (``app.domain.outcome``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import uuid
from pathlib import Path
from typing import IO, Any, Protocol

import redis
import redis.client
from sqlalchemy.exc import SQLAlchemyError

from app.domain.states import EventKind
from app.domain.stopping import StopReason
from app.queue import cancel_channel
from workers import drain
from workers.checkpoint_sync import CheckpointSync
from workers.lease_writer import LeaseWriter
from workers.trainers import protocol
from workers.watchdog import Deadline, retry_delay

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What the supervision loop needs of a trainer run: one ``TrainerProcess``, or a gang of
    them (``workers.gang.GangProcess``)."""

    @property
    def control(self) -> IO[bytes]: ...
    @property
    def output(self) -> IO[bytes]: ...
    def poll(self) -> int | None: ...
    def ask_stop(self) -> None: ...
    def signal_group(self, sig: signal.Signals) -> None: ...
    def kill(self) -> int: ...
    def close(self) -> None: ...
    def exit_fd(self) -> int | None:
        """A new descriptor, readable once the trainer has exited, that the caller closes; or
        None (the loop then sees the exit at its next tick)."""


class Heartbeat:
    """Renews the lease every ``interval``; after a failed renewal, tries again promptly
    (``watchdog.retry_delay``)."""

    def __init__(self, writer: LeaseWriter, deadline: Deadline, *, interval: float) -> None:
        self.writer = writer
        self.deadline = deadline
        self.interval = interval
        self.next_at = time.monotonic() + interval

    def seconds_left(self) -> float:
        return max(0.0, self.next_at - time.monotonic())

    def due_now(self) -> None:
        self.next_at = time.monotonic()

    def tick(self) -> list[StopReason]:
        """Renew if due. Returns the stop reasons the renewal revealed; raises LeaseLost."""
        if time.monotonic() < self.next_at:
            return []
        try:
            beat = self.writer.heartbeat()
        except SQLAlchemyError as exc:  # the watchdog decides when this means giving up
            retry = retry_delay(self.interval)
            self.next_at = time.monotonic() + retry
            log.warning(
                "%s: heartbeat failed (%.1fs without renewal; next try in %.2fs): %s",
                self.writer.tag,
                self.deadline.silent_for,
                retry,
                exc,
            )
            return []
        self.deadline.renew()
        self.next_at = time.monotonic() + self.interval
        reasons = []
        if not beat.device_held:
            reasons.append(StopReason.DEVICE_LOST)
        if beat.cancel_requested:
            reasons.append(StopReason.CANCELLED)
        return reasons


class CancelWakeup:
    """Listens on the job's cancel channel (``app.queue.cancel_channel``), so that a cancel
    reaches the trainer within a tick rather than at the next heartbeat. A message proves
    nothing: it makes the heartbeat due now, and Postgres says whether the job was cancelled.
    Without Redis the heartbeat still finds the cancel, one interval later at most."""

    def __init__(self, broker_url: str, job_id: uuid.UUID) -> None:
        self.channel = cancel_channel(job_id)
        self.client = redis.Redis.from_url(broker_url, socket_timeout=1, socket_connect_timeout=1)
        self.pubsub: redis.client.PubSub | None = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            self.pubsub.subscribe(self.channel)
        except redis.RedisError as exc:
            log.warning(
                "%s: no cancel wake-ups (%s); the heartbeat still sees cancels", job_id, exc
            )
            self.close()

    def rang(self) -> bool:
        """Whether a cancel was announced since the last call. Never blocks."""
        if self.pubsub is None:
            return False
        rang = False
        try:
            while (message := self.pubsub.get_message(timeout=0.0)) is not None:
                rang = rang or message.get("type") == "message"
        except redis.RedisError as exc:
            log.warning("cancel wake-ups lost (%s); the heartbeat still sees cancels", exc)
            self.close()
        return rang

    def close(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                self.pubsub.close()
            self.pubsub = None
        with contextlib.suppress(redis.RedisError):
            self.client.close()


class RuntimeLimit:
    """The job's ``max_runtime`` for this attempt, counted from when the lease was won."""

    def __init__(self, max_runtime_s: float | None, *, started_at: float) -> None:
        self.ends_at = None if max_runtime_s is None else started_at + max_runtime_s

    def tick(self) -> list[StopReason]:
        if self.ends_at is not None and time.monotonic() >= self.ends_at:
            return [StopReason.DEADLINE]
        return []


class DrainCheck:
    """One ``stat()`` per tick: has this worker been told to shut down?"""

    def __init__(self, flag: Path | None) -> None:
        self.flag = flag

    def tick(self) -> list[StopReason]:
        return [StopReason.DRAINING] if drain.requested(self.flag) else []


class StopEscalation:
    """Ask the trainer to stop; SIGTERM its group after STOP_GRACE_S, SIGKILL after TERM_GRACE_S
    more. A reason that kills skips the asking."""

    #: seconds a trainer gets to checkpoint and exit after being asked, then after SIGTERM.
    STOP_GRACE_S = 10.0
    TERM_GRACE_S = 5.0

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.asked_at: float | None = None
        self.term_at: float | None = None

    def begin(self, reason: StopReason) -> None:
        if reason.kills:
            self.trainer.signal_group(signal.SIGKILL)
        elif self.asked_at is None:
            self.asked_at = time.monotonic()
            self.trainer.ask_stop()

    def tick(self) -> None:
        if self.asked_at is None or self.trainer.poll() is not None:
            return
        now = time.monotonic()
        if self.term_at is None and now - self.asked_at > self.STOP_GRACE_S:
            self.term_at = now
            self.trainer.signal_group(signal.SIGTERM)
        elif self.term_at is not None and now - self.term_at > self.TERM_GRACE_S:
            self.trainer.signal_group(signal.SIGKILL)


class OutputShipper:
    """Buffers the trainer's output and stores it every FLUSH_S, or at FLUSH_BYTES. Keeps its
    last TAIL_BYTES: a command's failure is classified from them (``app.domain.failures``)."""

    FLUSH_S = 1.0
    FLUSH_BYTES = 64 * 1024
    TAIL_BYTES = 16 * 1024

    def __init__(self, writer: LeaseWriter) -> None:
        self.writer = writer
        self.buffer = b""
        self.tail = b""
        self.flushed_at = time.monotonic()

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        self.tail = (self.tail + chunk)[-self.TAIL_BYTES :]
        if len(self.buffer) >= self.FLUSH_BYTES:
            self.flush()

    def tick(self) -> None:
        if self.buffer and time.monotonic() - self.flushed_at >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Store what is buffered. Refused (a zombie's output) raises LeaseLost."""
        if not self.buffer:
            return
        text = self.buffer.decode(errors="replace")
        self.buffer = b""
        self.flushed_at = time.monotonic()
        self.writer.output(text)


class Relay:
    """Reads the trainer's control messages and writes what they say, fenced. It keeps only
    what decides the run's end (the result or the failure), not the messages themselves."""

    def __init__(self, writer: LeaseWriter, checkpoints: CheckpointSync) -> None:
        self.writer = writer
        #: uploads and records each checkpoint in the background (``workers.checkpoint_sync``).
        self.checkpoints = checkpoints
        self.partial = b""
        self.result: protocol.Result | None = None
        self.failure: protocol.Failure | None = None

    def feed(self, chunk: bytes) -> None:
        self.partial += chunk
        *lines, self.partial = self.partial.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = protocol.decode(line)
            except ValueError as exc:
                log.warning(
                    "%s: unreadable trainer message %r: %s", self.writer.tag, line[:200], exc
                )
                continue
            self.handle(msg)

    def handle(self, msg: Any) -> None:
        w = self.writer
        if isinstance(msg, protocol.Progress):
            w.progress(msg.model_dump(exclude={"type"}))
        elif isinstance(msg, protocol.CheckpointSaved):
            self.checkpoints.submit(msg.step, msg.path)
        elif isinstance(msg, protocol.CheckpointSkipped):
            w.event(EventKind.CHECKPOINT_SKIPPED, f"{msg.path}: {msg.reason}", _data(msg))
        elif isinstance(msg, protocol.Resumed):
            w.event(EventKind.RESUMED, f"resumed at step {msg.step} from {msg.path}", _data(msg))
        elif isinstance(msg, protocol.GpuMemory):
            w.gpu_peak(msg.peak_bytes)
        elif isinstance(msg, protocol.Result):
            self.result = msg
        elif isinstance(msg, protocol.Failure):
            self.failure = msg


def _data(msg: Any) -> dict[str, Any]:
    data: dict[str, Any] = msg.model_dump(exclude={"type"})
    return data
