"""One trainer run under watch: the loop that ticks the supervision parts until the trainer
exits, and the facts it leaves for the decision (``app.domain.outcome``)."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.domain.stopping import StopReason, StopReasons
from app.storage import Store
from workers.checkpoint_sync import CheckpointSync
from workers.lease_writer import LeaseLost, LeaseWriter
from workers.supervision import (
    CancelWakeup,
    DrainCheck,
    Heartbeat,
    OutputShipper,
    Relay,
    RuntimeLimit,
    StopEscalation,
    Trainer,
)
from workers.trainers import protocol
from workers.watchdog import Deadline

log = logging.getLogger(__name__)

Feed = Callable[[bytes], None]

#: the longest the loop sleeps between ticks (drain checks, log flushes, stop escalation).
TICK_S = 0.5
#: the checks (cancel doorbell, drain flag, runtime limit, log flush, stop escalation) run at
#: most this often: every trainer message wakes the loop, and a step may report many per second.
CHECK_S = 0.1
#: after the trainer exits, how long its remaining output may take to arrive.
DRAIN_OUTPUT_S = 2.0
#: the selector key data of the trainer's exit descriptor (``Trainer.exit_fd``): never read.
EXITED = "exited"


@dataclass(frozen=True)
class WatchSettings:
    heartbeat_interval: float
    #: ``lease_ttl - 2 * heartbeat_interval``: no renewal for this long kills the trainer.
    watchdog_budget: float
    checkpoints_keep: int
    drain_flag: Path | None
    broker_url: str
    #: the job's max_runtime, and when (time.monotonic) this attempt's lease was won.
    max_runtime_s: float | None
    lease_started_at: float
    #: where checkpoints are uploaded (``workers.checkpoint_sync``); None: they stay here.
    store: Store | None = None


@dataclass(frozen=True)
class TrainerRun:
    """What one trainer process did, as the supervisor saw it."""

    exit_code: int | None
    result: protocol.Result | None
    failure: protocol.Failure | None
    #: the stop reason that decides the run's end (the highest seen), or None.
    stop: StopReason | None
    #: the last lines of its output (stdout and stderr).
    output_tail: str = ""


def watch(trainer: Trainer, writer: LeaseWriter, cfg: WatchSettings) -> TrainerRun:
    """Relay, renew and stop as needed until ``trainer`` has exited; its group is gone after."""
    stops = StopReasons()
    # Kills the trainer once the lease has gone the budget without renewal, so that it is gone
    # before anyone else may take the lease, even while this loop is stuck in a database call
    # that never returns (a network black hole).
    deadline = Deadline(
        budget=cfg.watchdog_budget,
        on_expire=lambda: _deadline_passed(trainer, writer, cfg.watchdog_budget),
        name="lease-watchdog",
    )
    heartbeat = Heartbeat(writer, deadline, interval=cfg.heartbeat_interval)
    drain = DrainCheck(cfg.drain_flag)
    runtime = RuntimeLimit(cfg.max_runtime_s, started_at=cfg.lease_started_at)
    cancel = CancelWakeup(cfg.broker_url, writer.job_id)
    escalation = StopEscalation(trainer)
    shipper = OutputShipper(writer)
    sync = CheckpointSync(writer, cfg.store, keep=cfg.checkpoints_keep)
    relay = Relay(writer, sync)
    streams: dict[int, Feed] = {
        trainer.control.fileno(): relay.feed,
        trainer.output.fileno(): shipper.feed,
    }
    sel = selectors.DefaultSelector()
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    # The trainer's output ends a moment before its exit can be reaped: without this the loop
    # then slept to its next tick with the GPU still leased (~0.4 s a job in bench/replay.py).
    exited = trainer.exit_fd()
    if exited is not None:
        sel.register(exited, selectors.EVENT_READ, EXITED)
    deadline.start()
    try:
        next_check = 0.0
        while trainer.poll() is None:
            _read(sel, streams, timeout=min(heartbeat.seconds_left(), TICK_S))
            if time.monotonic() < min(next_check, heartbeat.next_at):
                continue
            next_check = time.monotonic() + CHECK_S
            sync.check()
            shipper.tick()
            if cancel.rang():
                heartbeat.due_now()
            for reason in heartbeat.tick() + drain.tick() + runtime.tick():
                if stops.observe(reason):
                    log.warning("%s: stopping the trainer: %s", writer.tag, reason.name.lower())
                    escalation.begin(reason)
            escalation.tick()
        # The trainer has exited: end what it left behind, then take its last words.
        if exited is not None and exited in sel.get_map():
            sel.unregister(exited)
        trainer.signal_group(signal.SIGKILL)
        until = time.monotonic() + DRAIN_OUTPUT_S
        while sel.get_map() and time.monotonic() < until:
            _read(sel, streams, timeout=until - time.monotonic())
        shipper.flush()
        _finish_uploads(sync, heartbeat)
    except LeaseLost as exc:
        log.warning("%s: lease lost (%s); killing the trainer", writer.tag, exc)
        stops.observe(StopReason.LEASE_LOST)
    finally:
        deadline.stop()
        deadline.join()
        sync.close()
        sel.close()
        if exited is not None:
            os.close(exited)
        cancel.close()
        exit_code = trainer.kill()
        trainer.close()
    if deadline.fired:
        stops.observe(StopReason.DATABASE_UNREACHABLE)
    return TrainerRun(
        exit_code=exit_code,
        result=relay.result,
        failure=relay.failure,
        stop=stops.winner,
        output_tail=shipper.tail.decode(errors="replace"),
    )


def _finish_uploads(sync: CheckpointSync, heartbeat: Heartbeat) -> None:
    """Wait for the checkpoints still uploading (the run's end must see them recorded),
    renewing the lease meanwhile; LeaseLost if a record was refused."""
    while sync.pending():
        sync.wait(timeout=min(heartbeat.seconds_left(), TICK_S))
        heartbeat.tick()
    sync.check()


def _read(sel: selectors.BaseSelector, streams: dict[int, Feed], *, timeout: float) -> None:
    for key, _ in sel.select(max(timeout, 0.0)):
        if key.data == EXITED:  # the caller's poll() takes the exit code
            sel.unregister(key.fd)
            continue
        chunk = os.read(key.fd, 65536)
        if chunk:
            streams[key.fd](chunk)
        else:
            sel.unregister(key.fd)


def _deadline_passed(trainer: Trainer, writer: LeaseWriter, budget: float) -> None:
    log.error(
        "%s: no lease renewal for %.1fs; killing the trainer before the lease expires",
        writer.tag,
        budget,
    )
    with contextlib.suppress(Exception):
        trainer.signal_group(signal.SIGKILL)
