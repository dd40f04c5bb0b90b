"""One spare trainer per worker process, started ahead of the next job.

After each job (and when the pool process starts) the worker starts a trainer that imports the
framework of the job it last ran (torch first) and waits (``workers.trainers.warm``). The next
job of that framework is handed to it; any other job, or a spare that went stale, gets a cold
start and the spare is replaced. Stale means: it died, its environment would differ from a fresh
trainer's (the worker's environment changed), or the trainer code changed on disk since it
started (a deploy under a running worker).

PR_SET_PDEATHSIG follows the *thread* that started a process: spares are for a process whose
jobs run on one long-lived thread (a Celery pool process), not for supervisors on short-lived
threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from workers.trainer_process import TrainerProcess, trainer_environment

log = logging.getLogger(__name__)

#: the code a spare has imported, whose change on disk makes a spare stale.
_CODE_ROOTS = (Path(__file__).parent / "trainers", Path(__file__).parents[1] / "app" / "domain")


def code_version() -> float:
    """The newest modification time of the trainer's code (a few dozen stat calls)."""
    return max((p.stat().st_mtime for root in _CODE_ROOTS for p in root.glob("*.py")), default=0.0)


class WarmSpare:
    def __init__(self) -> None:
        self.trainer: TrainerProcess | None = None
        self.framework: str | None = None
        self.code: float = 0.0

    def start(self, framework: str) -> None:
        """Start a spare for ``framework`` (replacing one for another framework)."""
        if self.trainer is not None and self.framework == framework and self._fresh():
            return
        self.discard()
        try:
            self.trainer = TrainerProcess.spare(framework)
        except OSError as exc:  # no spare is no failure: the next job starts cold
            log.warning("could not start a spare trainer: %s", exc)
            return
        self.framework, self.code = framework, code_version()

    def take(self, framework: str, launch_file: Path) -> TrainerProcess | None:
        """The spare, running ``launch_file``; None when there is no fitting, fresh spare."""
        trainer, fits = self.trainer, self.framework == framework
        if trainer is None or not fits or not self._fresh():
            self.discard()
            return None
        self.trainer = None
        if not trainer.hand(launch_file):
            trainer.close()
            return None
        return trainer

    def _fresh(self) -> bool:
        trainer = self.trainer
        if trainer is None or trainer.poll() is not None:
            return False
        if trainer_environment(os.environ) != trainer.environment:
            log.info("the worker's environment changed: replacing the spare trainer")
            return False
        if code_version() != self.code:
            log.info("the trainer code changed: replacing the spare trainer")
            return False
        return True

    def discard(self) -> None:
        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            with contextlib.suppress(OSError):
                trainer.close()
