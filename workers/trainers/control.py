"""The trainer's two lines to its supervisor: messages out on the control fd, stop requests in.

A stop request is any of:

- a line ``stop`` on stdin (the supervisor's polite ask);
- SIGTERM (its firmer ask), or SIGINT (Ctrl-C in the terminal running ``gpufleet up`` reaches
  the whole process group: the job stops with a checkpoint instead of failing);
- end of file on stdin when stdin is a pipe: the supervisor closed it or died, and a trainer
  whose supervisor is gone must not go on writing checkpoints under a lease nobody renews.

The trainer sees the request at its next step (``TrainContext.should_stop``), saves a checkpoint
and exits with ``EXIT_STOPPED``.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from types import FrameType
from typing import BinaryIO, Protocol

from pydantic import BaseModel

from workers.trainers.protocol import CONTROL_FD_ENV, encode

STOP_LINE = "stop"


class Channel(Protocol):
    def send(self, message: BaseModel) -> None: ...


class ControlChannel:
    """Writes one JSON line per message to the control fd, whole lines only (thread-safe)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> ControlChannel:
        raw = os.environ.get(CONTROL_FD_ENV)
        if raw is None:
            raise RuntimeError(f"{CONTROL_FD_ENV} is not set: start trainers through the runner")
        return cls(os.fdopen(int(raw), "wb", buffering=0))

    def send(self, message: BaseModel) -> None:
        data = encode(message)
        with self._lock:
            view = memoryview(data)
            while view:  # an unbuffered write may be partial
                written = self._stream.write(view)
                view = view[written or 0 :]


class StopFlag:
    """Set once a stop was requested, by a signal, by stdin, or by hand in tests."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        """Listen for SIGTERM, SIGINT and stdin (main thread only)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        threading.Thread(target=self._read_stdin, name="stop-reader", daemon=True).start()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def _read_stdin(self) -> None:
        stdin = sys.stdin
        if stdin is None or stdin.closed:
            return
        try:
            is_pipe = stat.S_ISFIFO(os.fstat(stdin.fileno()).st_mode)
            for line in stdin:
                if line.strip() == STOP_LINE:
                    self.request("stop on stdin")
        except (OSError, ValueError):
            return
        if is_pipe:
            self.request("stdin closed: the supervisor is gone")
