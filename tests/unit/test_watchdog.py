"""The deadline thread: renewals keep it quiet; silence past the budget fires it once."""

from __future__ import annotations

import threading
import time

from workers.watchdog import Deadline


def test_renewed_in_time_it_never_fires() -> None:
    fired = threading.Event()
    deadline = Deadline(budget=0.3, on_expire=fired.set, name="t")
    deadline.start()
    for _ in range(10):
        time.sleep(0.1)
        deadline.renew()
    deadline.stop()
    assert not fired.is_set() and not deadline.fired


def test_silence_past_the_budget_fires_once_even_if_the_renewer_is_stuck() -> None:
    calls: list[float] = []
    deadline = Deadline(budget=0.3, on_expire=lambda: calls.append(time.monotonic()), name="t")
    started = time.monotonic()
    deadline.start()
    time.sleep(1.0)  # the renewing thread is "stuck": no renew() at all
    deadline.stop()
    assert len(calls) == 1 and deadline.fired
    assert 0.3 <= calls[0] - started < 0.5
