"""How a command's exit reads in the trainer protocol's terms (``workers.command_job.settle``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.domain.outcome import EXIT_INFRA, EXIT_OOM, EXIT_USER_ERROR
from workers.command_job import settle
from workers.watch import TrainerRun


def ran(code: int, tail: str = "") -> TrainerRun:
    return TrainerRun(exit_code=code, result=None, failure=None, stop=None, output_tail=tail)


def test_exit_0_is_a_result_and_a_signal_is_left_to_the_decision_table() -> None:
    done = settle(ran(0), Path("/out"))
    assert done.result is not None and done.result.model_path == "/out"
    killed = ran(-9, "CUDA out of memory")
    assert settle(killed, None) == killed


@pytest.mark.parametrize(
    ("tail", "code", "kind", "suspect"),
    [
        (
            "step 3\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate",
            EXIT_OOM,
            "oom",
            False,
        ),
        (
            "Traceback (most recent call last):\nValueError: bad lr",
            EXIT_USER_ERROR,
            "user_error",
            False,
        ),
        ("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", EXIT_INFRA, "infra", True),
    ],
)
def test_another_exit_is_classified_from_the_last_lines(
    tail: str, code: int, kind: str, suspect: bool
) -> None:
    out = settle(ran(1, tail), None)
    assert out.exit_code == code and out.failure is not None
    assert (out.failure.kind, out.failure.device_suspect) == (kind, suspect)
    assert out.failure.message.startswith("the command exited with code 1: ")
