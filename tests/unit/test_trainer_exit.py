"""A spawned trainer's exit descriptor (``TrainerProcess.exit_fd``, a pidfd): the supervision
loop wakes on it at the trainer's exit instead of sleeping to its next tick."""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path

from workers.trainer_process import TrainerProcess


def test_a_spawned_trainer_s_exit_descriptor_is_readable_once_it_has_exited(
    tmp_path: Path,
) -> None:
    trainer = TrainerProcess.command(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], env={}, cwd=tmp_path
    )
    exited = trainer.exit_fd()
    assert exited is not None
    try:
        assert select.select([exited], [], [], 0.2)[0] == []  # still waiting on its stdin
        trainer.signal_group(signal.SIGKILL)
        assert select.select([exited], [], [], 60.0)[0] == [exited]
        assert trainer.poll() == -signal.SIGKILL  # reaped now, not at a later tick
    finally:
        os.close(exited)
        trainer.close()


def test_a_reaped_trainer_has_no_exit_descriptor(tmp_path: Path) -> None:
    # (its pid may already be another process's)
    trainer = TrainerProcess.command([sys.executable, "-c", "pass"], env={}, cwd=tmp_path)
    trainer.proc.wait(timeout=60)
    assert trainer.exit_fd() is None
    trainer.close()
