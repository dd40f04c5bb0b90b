"""The worker's side of the fork server (``workers.trainers.zygote``).

One zygote per pool process, started with it (or when a spare is first wanted): it imports
torch once, and each spare trainer after that is a fork of it, ready in milliseconds and
without the ~1.7 s of CPU a fresh interpreter spends importing torch (on a busy fleet, that
import ran beside every job). A forked trainer is a ``TrainerProcess`` like a spawned one: the
worker makes its pipes and sends them over; the zygote reports its exit code.

The zygote is replaced when it goes stale (the worker's environment or the trainer code changed
since it started, as for a spare) and restarted when it dies; meanwhile spares are spawned.
``GPUFLEET_TRAINER_START=spawn`` turns it off. Only torch spares are forked: TensorFlow starts
threads at import and is not fork-safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import time

from workers.trainer_code import code_version
from workers.trainer_process import TrainerProcess, trainer_environment
from workers.trainers import zygote as server

log = logging.getLogger(__name__)

#: the frameworks whose spares are forked.
FORKED_FRAMEWORKS = frozenset({"torch"})


class ZygoteGone(OSError):
    """The zygote died or refused: spawn instead."""


class ForkedChild:
    """What ``TrainerProcess`` needs of ``Popen``, for a process the zygote forked: its exit
    code comes from the zygote, through the child's status pipe."""

    def __init__(self, pid: int, stdin: int, status: int, zygote: Zygote) -> None:
        self.pid = pid
        self.stdin = os.fdopen(stdin, "wb")
        self.status = status
        self.zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _, _ = select.select([self.status], [], [], 0)
            if ready:
                self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self.status], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            self._read_status()
        assert self.returncode is not None
        return self.returncode

    def _read_status(self) -> None:
        data = b""
        while chunk := os.read(self.status, 64):
            data += chunk
        os.close(self.status)
        text = data.decode().strip()
        # End of file without a code: the zygote died, and by PR_SET_PDEATHSIG so did the child.
        self.returncode = int(text) if text else -9
        self.zygote.reap(self.pid)


class ForkedTrainer(TrainerProcess):
    """A spare trainer forked by the zygote (see ``TrainerProcess`` for the rest)."""

    def __init__(self, zygote: Zygote, framework: str, *, wait_s: float = 0.0) -> None:
        self.environment = trainer_environment(os.environ)
        self.code = zygote.code
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        control_r, control_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            pid = zygote.fork(
                {"env": self.environment, "cwd": os.getcwd(), "framework": framework},
                [stdin_r, out_w, control_w, status_w],
                wait_s=wait_s,
            )
        except BaseException:
            for fd in (stdin_w, out_r, control_r, status_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, out_w, control_w, status_w):
                os.close(fd)
        self.proc = ForkedChild(pid, stdin_w, status_r, zygote)
        self.control = os.fdopen(control_r, "rb", buffering=0)
        self.output = os.fdopen(out_r, "rb")

    def exit_fd(self) -> int | None:
        """The status pipe (a copy): readable once the zygote reports the exit."""
        proc = self.proc
        if not isinstance(proc, ForkedChild) or proc.returncode is not None:
            return None
        return os.dup(proc.status)

    def close(self) -> None:
        # End of file first: a spare that is not in its process group yet exits on it.
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        super().close()


class Zygote:
    """The fork server of this pool process; ``fork`` starts it, restarts it or replaces it."""

    #: how long a fork request waits for the zygote's answer (a fork takes milliseconds).
    REPLY_TIMEOUT_S = 30.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.environment: dict[str, str] = {}
        self.code = 0.0
        self.ready = False
        #: zygotes that died or failed to start; past ``MAX_FAILURES`` spares are spawned.
        self.failures = 0

    MAX_FAILURES = 3

    @property
    def usable(self) -> bool:
        return self.failures < self.MAX_FAILURES

    def start(self) -> None:
        """Start the zygote if there is none, or it died, or went stale (non-blocking)."""
        if self.proc is not None and self.proc.poll() is None and self._fresh():
            return
        if self.proc is not None and self.proc.poll() is not None:
            self.failures += 1
            log.warning("the trainer fork server died (exit %s)", self.proc.returncode)
        self.stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.environment = trainer_environment(os.environ)
        self.code = code_version()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.trainers.zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=self.environment,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self.REPLY_TIMEOUT_S)  # a hung zygote: ZygoteGone, not a hung worker
        self.sock, self.ready = ours, False
        log.info("started the trainer fork server (pid %s)", self.proc.pid)

    def _fresh(self) -> bool:
        if trainer_environment(os.environ) != self.environment:
            log.info("the worker's environment changed: replacing the trainer fork server")
            return False
        if code_version() != self.code:
            log.info("the trainer code changed: replacing the trainer fork server")
            return False
        return True

    def wait_ready(self, timeout: float) -> bool:
        """Whether the zygote has imported torch (waiting at most ``timeout``)."""
        if self.ready:
            return True
        if self.sock is None:
            return False
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return False
            message, _ = server.receive(self.sock)
            if message is None or not message.get("ready"):
                self.failures += 1
                self.stop()
                raise ZygoteGone(f"the trainer fork server did not start: {message}")
            self.ready = True
            return True

    def fork(self, request: dict[str, object], fds: list[int], *, wait_s: float = 0.0) -> int:
        """The pid of a child forked with ``fds``; ZygoteGone if there is no ready zygote."""
        self.start()
        try:
            ready = self.wait_ready(wait_s)
        except OSError as exc:
            self.stop()
            raise ZygoteGone(f"the trainer fork server failed: {exc}") from exc
        if not ready:
            raise ZygoteGone("the trainer fork server is still importing")
        assert self.sock is not None
        try:
            server.send(self.sock, {"op": "fork", **request}, fds)
            reply, _ = server.receive(self.sock)
        except OSError as exc:
            self.failures += 1
            self.stop()
            raise ZygoteGone(f"the trainer fork server failed: {exc}") from exc
        if reply is None or "pid" not in reply:
            self.failures += 1
            self.stop()
            raise ZygoteGone(f"the trainer fork server refused: {reply}")
        return int(reply["pid"])

    def reap(self, pid: int) -> None:
        """Let the zygote reap an exited child (whose pid was reserved until now)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                server.send(self.sock, {"op": "reap", "pid": pid})

    def stop(self) -> None:
        """End the zygote (its children die with it)."""
        sock, proc, self.sock, self.proc, self.ready = self.sock, self.proc, None, None, False
        if sock is not None:
            sock.close()  # end of file: it exits
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid
