"""The trainer as a process: a fresh interpreter in a process group of its own, with an
allow-listed environment.

- **Fresh interpreter** (``subprocess``): CUDA starts clean, and Celery's prefork children are
  daemonic, so ``multiprocessing`` children are not allowed there.
- **Own process group** (``start_new_session``): stopping the trainer signals the whole group,
  so DataLoader workers and anything else it spawned go with it.
- **Allow-listed environment**: the trainer runs the user's code, so it gets only what a
  training process needs (paths, locale, threading and CUDA variables, the control pipe) and
  never the worker's database or broker URL, API tokens or storage credentials.
- **Dies with its supervisor**: the trainer sets ``PR_SET_PDEATHSIG`` itself at start
  (``workers.trainers.lifeline``): a ``preexec_fn`` would run between fork and exec, which is
  unsafe once the supervisor has threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Protocol

from workers.trainers import protocol
from workers.trainers.lifeline import SUPERVISOR_PID_ENV

#: variables passed to the trainer as they are.
ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "LD_LIBRARY_PATH",
    }
)
#: families of variables passed as they are: locale, CUDA/NCCL, math-library threading.
ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "OMP_", "OPENBLAS_", "MKL_")


def trainer_environment(
    parent: Mapping[str, str], declared: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The trainer's environment: the allow-listed part of ``parent`` plus what the job
    declares. Nothing named ``GPUFLEET_*`` passes except what the supervisor sets for it."""
    env = {
        name: value
        for name, value in parent.items()
        if name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)
    }
    env.update(declared or {})
    env["PYTHONUNBUFFERED"] = "1"
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


class Process(Protocol):
    """What a trainer's process offers: a ``Popen``, or a child of the fork server
    (``workers.zygote.ForkedChild``)."""

    @property
    def pid(self) -> int: ...
    @property
    def stdin(self) -> IO[bytes] | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class TrainerProcess:
    """One trainer run's process: started, asked to stop, signalled as a group."""

    proc: Process
    control: IO[bytes]
    output: IO[bytes]
    environment: dict[str, str]

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: Path | None = None,
        declared: Mapping[str, str] | None = None,
    ) -> None:
        read_fd, write_fd = os.pipe()
        self.environment = trainer_environment(os.environ, declared)
        env = {**self.environment, protocol.CONTROL_FD_ENV: str(write_fd)}
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.proc = popen
        self.control = os.fdopen(read_fd, "rb", buffering=0)
        assert popen.stdout is not None
        self.output = popen.stdout

    @classmethod
    def cold(
        cls,
        launch_file: Path,
        *,
        code: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TrainerProcess:
        """A trainer for ``launch_file`` in a fresh interpreter (imports and all); ``code`` (the
        job's unpacked snapshot) goes on its ``PYTHONPATH`` and is its working directory;
        ``env`` is added to its environment (a gang rank's variables)."""
        argv = [sys.executable, "-m", "workers.trainers.main", str(launch_file)]
        if code is None:
            return cls(argv, declared=env)
        inherited = os.environ.get("PYTHONPATH", "")
        path = os.pathsep.join(p for p in (str(code), inherited) if p)
        return cls(argv, cwd=code, declared={**(env or {}), "PYTHONPATH": path})

    @classmethod
    def spare(cls, framework: str) -> TrainerProcess:
        """A trainer that imports ``framework`` now and waits for its launch (``hand``)."""
        return cls([sys.executable, "-m", "workers.trainers.warm", framework])

    @classmethod
    def command(cls, argv: list[str], *, env: Mapping[str, str], cwd: Path) -> TrainerProcess:
        """A command job's own program (``workers.command_job``), run without a shell."""
        return cls(argv, cwd=cwd, declared=env)

    def hand(self, launch_file: Path) -> bool:
        """Give a spare its job. False if it is gone (start a cold one instead)."""
        stdin = self.proc.stdin
        if stdin is None or self.poll() is not None:
            return False
        try:
            stdin.write(f"{launch_file}\n".encode())
            stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def ask_stop(self) -> None:
        """Ask the trainer to checkpoint at its next step boundary and exit."""
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                stdin.write(b"stop\n")
                stdin.flush()

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the trainer and everything it spawned. Safe from any thread, any time."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> int:
        """Kill the whole group and reap the trainer; returns its exit code."""
        self.signal_group(signal.SIGKILL)
        return self.proc.wait()

    def exit_fd(self) -> int | None:
        """A pidfd of the process (readable once it has exited), for the watch loop to wake at
        the exit instead of at its next tick: the end of output comes before the exit, and the
        GPU stayed leased until that tick (up to ``watch.TICK_S`` after every job)."""
        proc = self.proc
        # (a reaped process's pid may be someone else's by now)
        if not isinstance(proc, subprocess.Popen) or proc.returncode is not None:
            return None
        try:
            return os.pidfd_open(proc.pid)
        except OSError:  # gone already, or no pidfd here: the tick sees it
            return None

    def close(self) -> None:
        """After the run: nothing of the group may outlive it, and the pipes are closed."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        for stream in (self.control, self.output, self.proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
