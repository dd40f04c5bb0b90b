"""``gpufleet up``'s supervisor: the API, the reaper and a worker per GPU as child processes.

A child that stops on its own is started again after a back-off (1 s, doubling to 30 s; back
to 1 s once a child had run for a minute), with a line saying why. A worker stops itself when
its watchdog fires during a database outage or it loses its device claim; without this, one
outage would leave the machine with no worker. Only a child that exits with code 2 (its
settings are wrong; starting it again cannot help) stops the whole fleet.

SIGINT (Ctrl-C) or SIGTERM stops the fleet: each child's leader gets SIGTERM, as ``docker
stop`` sends it, so a worker hands its job back at a checkpoint before it exits; a second
signal kills everything at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("gpufleet.up")

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
#: a child that ran this long before it stopped is started again after FIRST_DELAY_S.
HEALTHY_RUN_S = 60.0
#: the exit code of a child whose settings are wrong (typer's usage errors and ours).
SETTINGS_EXIT_CODE = 2
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2


def next_delay(previous: float | None, ran_for: float) -> float:
    """The back-off before starting a child again: the first stop, or a stop after a healthy
    run, waits FIRST_DELAY_S; each quick stop after that waits twice as long, up to
    MAX_DELAY_S."""
    if previous is None or ran_for >= HEALTHY_RUN_S:
        return FIRST_DELAY_S
    return min(previous * 2, MAX_DELAY_S)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Child:
    """One process of the fleet, started again with a back-off whenever it stops."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float | None = None
    restart_at: float | None = None
    starts: int = 0

    def start(self, now: float) -> None:
        self.popen = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = now
        self.restart_at = None
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class LocalFleet:
    children: list[Child]
    clock: Callable[[], float] = time.monotonic
    stopping: bool = False
    #: why the fleet stopped on its own (a child with bad settings), if it did.
    failure: str | None = None
    _signals: int = field(default=0, repr=False)

    def start(self) -> None:
        now = self.clock()
        for child in self.children:
            child.start(now)

    def tick(self) -> None:
        """Notice children that stopped; start again those whose back-off is over."""
        now = self.clock()
        for child in self.children:
            if child.popen is None or self.stopping:
                continue
            code = child.popen.poll()
            if code is None:
                continue
            if child.restart_at is None:
                ran_for = now - child.started_at
                if code == SETTINGS_EXIT_CODE:
                    self.failure = f"{child.name} {describe_exit(code)}: its settings are wrong"
                    self.stopping = True
                    return
                child.delay = next_delay(child.delay, ran_for)
                child.restart_at = now + child.delay
                log.warning(
                    "%s (pid %d) %s after %.1f s; starting it again in %g s",
                    child.name,
                    child.popen.pid,
                    describe_exit(code),
                    ran_for,
                    child.delay,
                )
            elif now >= child.restart_at:
                child.start(now)
                assert child.popen is not None
                log.info("%s started again (pid %d)", child.name, child.popen.pid)

    def request_stop(self, *_: object) -> None:
        """Signal handler: the first signal stops the fleet, a second kills it."""
        self._signals += 1
        self.stopping = True
        if self._signals > 1:
            self.kill()

    def run(self) -> int:
        """Start the children and watch them until a signal (exit code 0) or a child with bad
        settings (exit code 1); the children are stopped either way."""
        previous = {
            sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.start()
            while not self.stopping:
                time.sleep(POLL_S)
                self.tick()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.failure:
            log.error("gpufleet up: %s; stopping the fleet", self.failure)
            return 1
        return 0

    def stop(self) -> None:
        # The leader only, as `docker stop` does: a worker then hands its job back at a
        # checkpoint (workers/drain.py) before it exits; its children follow it.
        self.stopping = True
        for child in self.children:
            if child.running:
                assert child.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.popen.pid, signal.SIGTERM)
        deadline = self.clock() + STOP_TIMEOUT_S
        for child in self.children:
            if child.popen is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(0.0, deadline - self.clock()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every child's process group: a stuck leader, or what outlived it."""
        for child in self.children:
            if child.popen is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.popen.pid, signal.SIGKILL)
