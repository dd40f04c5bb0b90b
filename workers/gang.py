"""Running a gang (a job of ``gpu_count`` > 1): its N rank processes as one trainer.

The leader's supervisor runs a :class:`GangProcess` exactly where it would run one
``TrainerProcess`` (``workers.watch``): the same ``poll``/``ask_stop``/``signal_group``/``kill``/
``close`` and one ``control`` and one ``output`` stream. Underneath, each rank is a
``TrainerProcess`` of its own (fresh interpreter, own process group, allow-listed environment,
dies with the supervisor) with torch.distributed's environment (:func:`rank_environment`), and:

- **one failure stops all**: the first rank to exit with anything but success or a requested
  stop has every other rank's group killed at once (they would otherwise wait in an
  all-reduce), and its exit code is the gang's. A rank that sent its result has finished,
  whatever its exit code after that (a crash in torch.distributed's teardown at interpreter
  exit is not a failed attempt);
- **control**: rank 0's messages (progress, checkpoints, result) are relayed; of the other
  ranks only a failure is, and only the first failure of the gang, so the attempt ends with the
  class of the first failure;
- **output**: every rank's lines go to the job's log, each prefixed ``[rank N]``.

Stopping on request needs no coordination here: every rank is asked, and the ranks agree on
the step to stop at (``workers.trainers.distributed.any_rank``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import IO, BinaryIO

from app.domain.spec import JobSpec
from workers.trainer_process import TrainerProcess
from workers.trainers import protocol

#: the ranks of a gang run on one host, so they meet on the loopback interface.
MASTER_ADDR = "127.0.0.1"

#: exit codes that do not stop the other ranks: they end the same way on their own.
_PEACEFUL = frozenset({protocol.EXIT_OK, protocol.EXIT_STOPPED})
#: how long a rank's exit waits for its control relay to read what it sent last.
RELAY_DRAIN_S = 2.0

log = logging.getLogger(__name__)


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


def replicas_in_one_process(spec: JobSpec) -> bool:
    """Whether a gang's devices are one trainer process's replicas rather than N ranks: the
    built-in TensorFlow trainer mirrors the model on each GPU it sees (MirroredStrategy,
    ``workers.trainers.tf_replicas``); everything else runs a rank per GPU."""
    return spec.command is None and spec.entrypoint is None and spec.framework == "tensorflow"


def replica_environment(devices: Sequence[str], *, real_gpus: bool) -> dict[str, str]:
    """The one process of a replicated gang sees every device of the gang (by UUID, the
    leader's first); simulated devices set no CUDA variable."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if real_gpus else {}


def free_port() -> int:
    """A free TCP port on the loopback interface for the ranks' rendezvous (rank 0 binds it
    a moment later; another process taking it meanwhile fails the attempt as infra)."""
    with socket.socket() as s:
        s.bind((MASTER_ADDR, 0))
        port: int = s.getsockname()[1]
        return port


def leader_first(devices: Sequence[str], leader: str | None) -> list[str]:
    """The gang's devices with the leader's first (it is rank 0), the others in index order."""
    ordered = list(devices)
    if leader in ordered:
        ordered.remove(leader)
        ordered.insert(0, leader)
    return ordered


class GangProcess:
    """N ranks of one trainer run, seen as one ``TrainerProcess`` (see the module)."""

    def __init__(self, ranks: list[TrainerProcess]) -> None:
        if not ranks:
            raise ValueError("a gang needs at least one rank")
        self.ranks = ranks
        self._lock = threading.Lock()  #: the ranks' exit codes and the failure relayed
        self._write_lock = threading.Lock()  #: whole lines into the merged streams
        self._failed: int | None = None  #: the first rank to fail
        self._failure_sent = False
        self._codes: dict[int, int] = {}
        self._finished: set[int] = set()  #: the ranks that sent their result
        control_read, self._control_w = os.pipe()
        output_read, self._output_w = os.pipe()
        self.control: BinaryIO = os.fdopen(control_read, "rb", buffering=0)
        self.output: BinaryIO = os.fdopen(output_read, "rb", buffering=0)
        self._open_writers = {"control": len(ranks), "output": len(ranks)}
        self._threads = [
            threading.Thread(target=fn, args=(rank,), name=f"gang{fn.__name__}-{rank}", daemon=True)
            for rank in range(len(ranks))
            for fn in (self._relay_control, self._relay_output, self._wait)
        ]
        #: each rank's control relay, which has read all the rank said once it ends.
        self._control_relays = [t for t in self._threads if t.name.startswith("gang_relay_control")]
        for thread in self._threads:
            thread.start()

    @classmethod
    def start(
        cls,
        devices: Sequence[str],
        *,
        real_gpus: bool,
        rank_process: Callable[[dict[str, str]], TrainerProcess],
    ) -> GangProcess:
        """Start one rank per device, meeting on a free local port: ``rank_process(env)``
        starts the rank's process (the built-in or custom trainer, or the job's command) with
        its torch.distributed variables ``env`` added to what it would get alone."""
        port = free_port()
        ranks: list[TrainerProcess] = []
        try:
            for rank in range(len(devices)):
                env = rank_environment(
                    rank=rank, devices=devices, master_port=port, real_gpus=real_gpus
                )
                ranks.append(rank_process(env))
        except BaseException:
            for started in ranks:
                started.close()
            raise
        return cls(ranks)

    # -- the TrainerProcess interface ------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.ranks[0].pid

    def poll(self) -> int | None:
        """None while any rank runs; then the first failed rank's code, else rank 0's."""
        with self._lock:
            if len(self._codes) < len(self.ranks):
                return None
            if self._failed is not None:
                return self._codes[self._failed]
            return self._codes[0]

    def ask_stop(self) -> None:
        for rank in self.ranks:
            rank.ask_stop()

    def exit_fd(self) -> int | None:
        """None: a gang's end is seen at the loop's tick (its ranks end one by one)."""
        return None

    def signal_group(self, sig: signal.Signals) -> None:
        for rank in self.ranks:
            rank.signal_group(sig)

    def kill(self) -> int:
        self.signal_group(signal.SIGKILL)
        for rank in self.ranks:
            rank.proc.wait()
        for thread in self._threads:
            if thread.name.startswith("gang_wait"):
                thread.join()
        code = self.poll()
        assert code is not None
        return code

    def close(self) -> None:
        """After the run: every rank's group is gone, the relay threads have ended (a write
        into a merged stream nobody reads any more fails at once), every pipe is closed."""
        for stream in (self.control, self.output):
            with contextlib.suppress(OSError):
                stream.close()
        for rank in self.ranks:
            rank.close()
        for thread in self._threads:
            thread.join(timeout=5)
        for name in ("control", "output"):
            self._close_writer(name, force=True)

    # -- the threads -----------------------------------------------------------------------

    def _wait(self, rank: int) -> None:
        code = self.ranks[rank].proc.wait()
        # What the rank sent before it exited decides how its exit is read: let its relay
        # read to the end of its stream first (it ends with the rank and whatever it spawned).
        self._control_relays[rank].join(timeout=RELAY_DRAIN_S)
        with self._lock:
            if code not in _PEACEFUL and rank in self._finished:
                # Its training ended and its result was sent; the process then died in its
                # teardown (gloo's threads at interpreter exit: "terminate called without an
                # active exception", SIGABRT). Nothing it did is lost: it finished.
                log.warning(
                    "gang rank %d exited with code %d after sending its result; counted as "
                    "finished",
                    rank,
                    code,
                )
                code = protocol.EXIT_OK
            self._codes[rank] = code
            first = code not in _PEACEFUL and self._failed is None
            if first:
                self._failed = rank
        if first:
            for other, process in enumerate(self.ranks):
                if other != rank:
                    process.signal_group(signal.SIGKILL)

    def _relay_control(self, rank: int) -> None:
        partial = b""
        stream = self.ranks[rank].control
        try:
            while chunk := _read(stream):
                partial += chunk
                *lines, partial = partial.split(b"\n")
                for line in lines:
                    if line.strip() and self._passes(rank, line):
                        self._write(self._control_w, line + b"\n")
        finally:
            self._close_writer("control")

    def _passes(self, rank: int, line: bytes) -> bool:
        """Rank 0's messages pass, and the gang's first failure, whichever rank sent it."""
        try:
            msg = protocol.decode(line)
        except ValueError:
            return rank == 0  # the supervisor's relay says it is unreadable
        if isinstance(msg, protocol.Result):
            with self._lock:
                self._finished.add(rank)
        if not isinstance(msg, protocol.Failure):
            return rank == 0
        with self._lock:
            if self._failure_sent:
                return False
            self._failure_sent = True
            return True

    def _relay_output(self, rank: int) -> None:
        prefix = f"[rank {rank}] ".encode()
        partial = b""
        stream = self.ranks[rank].output
        try:
            while chunk := _read(stream):
                partial += chunk
                *lines, partial = partial.split(b"\n")
                if lines:
                    self._write(self._output_w, b"".join(prefix + line + b"\n" for line in lines))
            if partial:
                self._write(self._output_w, prefix + partial + b"\n")
        finally:
            self._close_writer("output")

    def _write(self, fd: int, data: bytes) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    def _close_writer(self, name: str, *, force: bool = False) -> None:
        """The merged stream ends (EOF for the supervisor) once every rank's stream has."""
        with self._lock:
            if self._open_writers[name] <= 0:
                return
            self._open_writers[name] = 0 if force else self._open_writers[name] - 1
            if self._open_writers[name] == 0:
                with contextlib.suppress(OSError):
                    os.close(self._control_w if name == "control" else self._output_w)


def _read(stream: IO[bytes]) -> bytes:
    try:
        return os.read(stream.fileno(), 65536)
    except (OSError, ValueError):
        return b""
