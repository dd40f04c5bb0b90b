"""The worker's queue gate: pause and resume its queues through remote control, to itself."""

from __future__ import annotations

from typing import Any

from workers.main import QueueGate


class FakeControl:
    """Celery's ``app.control``: records the calls, answers like the worker would."""

    def __init__(self, replies: list[Any] | Exception) -> None:
        self.replies = replies
        self.calls: list[tuple[str, str, list[str]]] = []

    def _send(self, what: str, queue: str, *, destination: list[str], **_: Any) -> list[Any]:
        self.calls.append((what, queue, destination))
        if isinstance(self.replies, Exception):
            raise self.replies
        return self.replies

    def cancel_consumer(self, queue: str, **kwargs: Any) -> list[Any]:
        return self._send("cancel", queue, **kwargs)

    def add_consumer(self, queue: str, **kwargs: Any) -> list[Any]:
        return self._send("add", queue, **kwargs)


class FakeApp:
    def __init__(self, control: FakeControl) -> None:
        self.control = control


QUEUES = ["gpu.A100.80", "gpu.any.80"]


def test_pause_then_resume_every_queue_of_this_worker_in_order() -> None:
    control = FakeControl([{"A100-0@h": {"ok": "done"}}])
    gate = QueueGate(FakeApp(control), "A100-0@h", QUEUES)
    assert gate(True) and gate(False)
    assert control.calls == [
        ("cancel", "gpu.A100.80", ["A100-0@h"]),
        ("cancel", "gpu.any.80", ["A100-0@h"]),
        ("add", "gpu.A100.80", ["A100-0@h"]),
        ("add", "gpu.any.80", ["A100-0@h"]),
    ]


def test_no_answer_or_no_broker_means_try_again() -> None:
    assert not QueueGate(FakeApp(FakeControl([])), "w", QUEUES)(True)
    assert not QueueGate(FakeApp(FakeControl(ConnectionError("down"))), "w", QUEUES)(True)
