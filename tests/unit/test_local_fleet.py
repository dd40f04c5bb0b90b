"""``gpufleet up``'s supervisor: back-off arithmetic, and restarts of children that stop."""

from __future__ import annotations

import sys

from app.local_fleet import (
    FIRST_DELAY_S,
    HEALTHY_RUN_S,
    MAX_DELAY_S,
    Child,
    LocalFleet,
    describe_exit,
    next_delay,
)


def test_the_back_off_doubles_to_its_cap_and_resets_after_a_healthy_run() -> None:
    delays: list[float] = []
    delay = None
    for _ in range(8):
        delay = next_delay(delay, ran_for=0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert next_delay(MAX_DELAY_S, ran_for=HEALTHY_RUN_S) == FIRST_DELAY_S


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed by SIGKILL"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _exiting(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


def test_a_child_that_stops_is_started_again_after_its_back_off() -> None:
    # Given a fleet whose one child exits at once
    clock = FakeClock()
    child = Child("worker-0", _exiting(1))
    fleet = LocalFleet([child], clock=clock)
    fleet.start()
    assert child.popen is not None
    child.popen.wait()
    # When the supervisor notices, it waits the first back-off
    fleet.tick()
    assert child.starts == 1 and child.restart_at == clock.now + FIRST_DELAY_S
    clock.now += FIRST_DELAY_S / 2
    fleet.tick()
    assert child.starts == 1
    # Then starts it again once the back-off is over, and waits twice as long the next time
    clock.now += FIRST_DELAY_S
    fleet.tick()
    assert child.starts == 2
    child.popen.wait()
    fleet.tick()
    assert child.delay == 2 * FIRST_DELAY_S
    assert not fleet.stopping and fleet.failure is None
    fleet.stop()


def test_a_child_with_bad_settings_stops_the_fleet_instead() -> None:
    clock = FakeClock()
    child = Child("api", _exiting(2))
    fleet = LocalFleet([child], clock=clock)
    fleet.start()
    assert child.popen is not None
    child.popen.wait()
    fleet.tick()
    assert fleet.stopping and fleet.failure is not None and "api" in fleet.failure
    clock.now += 60
    fleet.tick()
    assert child.starts == 1
