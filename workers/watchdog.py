"""A deadline kept by a thread of its own: it fires when nobody renewed it in time, even while
the thread that should renew it is stuck (in a database call that never returns, say)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: a failed renewal is tried again after this share of the heartbeat interval (at most
#: RETRY_MAX_S), not a whole interval later: the watchdog's budget is only a few intervals.
RETRY_SHARE = 0.25
RETRY_MAX_S = 1.0


def retry_delay(interval: float) -> float:
    """When to try a failed renewal again."""
    return min(interval * RETRY_SHARE, RETRY_MAX_S)


class Deadline(threading.Thread):
    def __init__(self, *, budget: float, on_expire: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.budget = budget
        self.on_expire = on_expire
        self.period = min(0.1, budget / 10)
        self.stopping = threading.Event()
        self.fired = False
        self._renewed = time.monotonic()

    def renew(self) -> None:
        self._renewed = time.monotonic()

    @property
    def silent_for(self) -> float:
        return time.monotonic() - self._renewed

    def run(self) -> None:
        while not self.stopping.wait(self.period):
            if self.silent_for >= self.budget:
                self.fired = True
                self.on_expire()
                return

    def stop(self) -> None:
        self.stopping.set()
