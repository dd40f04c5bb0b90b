"""One spare trainer per worker process, started ahead of the next job.

After each job (and when the pool process starts) the worker starts a trainer that imports the
framework of the job it last ran (torch first) and waits (``workers.trainers.warm``). The next
job of that framework is handed to it; any other job, or a spare that went stale, gets a cold
start and the spare is replaced. Stale means: it died, its environment would differ from a fresh
trainer's (the worker's environment changed), or the trainer code changed on disk since it
started (a deploy under a running worker).

With ``GPUFLEET_TRAINER_START=fork`` (the default on Linux) a torch spare is forked from the
worker's fork server (``workers.zygote``), which has imported torch once, instead of spawned:
a fresh spare costs milliseconds of CPU, not the seconds of an interpreter importing torch.
When the zygote is not there (still importing at start, dead, or replaced) the spare is spawned.

PR_SET_PDEATHSIG follows the *thread* that started a process: spares are for a process whose
jobs run on one long-lived thread (a Celery pool process), not for supervisors on short-lived
threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from workers.trainer_code import code_version
from workers.trainer_process import TrainerProcess, trainer_environment
from workers.zygote import FORKED_FRAMEWORKS, ForkedTrainer, Zygote, ZygoteGone

log = logging.getLogger(__name__)

__all__ = ["WarmSpare", "code_version"]


class WarmSpare:
    def __init__(self, start: str = "spawn") -> None:
        self.trainer: TrainerProcess | None = None
        self.framework: str | None = None
        self.code: float = 0.0
        self.zygote: Zygote | None = None
        self.configure(start)

    def configure(self, start: str) -> None:
        """``fork``: torch spares come from a fork server; ``spawn``: fresh interpreters."""
        if start == "fork" and self.zygote is None:
            self.zygote = Zygote()
        elif start != "fork" and self.zygote is not None:
            self.discard()
            self.zygote.stop()
            self.zygote = None

    def start(self, framework: str) -> None:
        """Start a spare for ``framework`` (replacing one for another framework)."""
        if self.trainer is not None and self.framework == framework and self._fresh():
            return
        self.discard()
        trainer: TrainerProcess | None = self._fork(framework)
        if trainer is None and not self._importing(framework):
            try:
                trainer = TrainerProcess.spare(framework)
            except OSError as exc:  # no spare is no failure: the next job starts cold
                log.warning("could not start a spare trainer: %s", exc)
        # (a fork server still importing: the spare is forked when the job comes, in ``take``)
        if trainer is not None:
            self.trainer, self.framework = trainer, framework
            self.code = trainer.code if isinstance(trainer, ForkedTrainer) else code_version()

    def take(self, framework: str, launch_file: Path) -> TrainerProcess | None:
        """The spare, running ``launch_file``; None when there is no fitting, fresh spare."""
        trainer, fits = self.trainer, self.framework == framework
        if trainer is None or not fits or not self._fresh():
            self.discard()
            # Never wait here for a fork server still importing: the lease is held, and nothing
            # renews it until the trainer runs under watch. Start cold instead.
            trainer = self._fork(framework)
            if trainer is None:
                return None
        self.trainer = None
        if not trainer.hand(launch_file):
            trainer.close()
            return None
        return trainer

    def _forks(self, framework: str) -> bool:
        zygote = self.zygote
        return zygote is not None and zygote.usable and framework in FORKED_FRAMEWORKS

    def _importing(self, framework: str) -> bool:
        """Whether the fork server is still importing (spawning a spare now would only compete
        with it for the CPU)."""
        zygote = self.zygote
        return self._forks(framework) and zygote is not None and zygote.pid is not None

    def _fork(self, framework: str) -> ForkedTrainer | None:
        """A spare forked from the fork server; None to spawn instead (no server, or one still
        importing: never waited for)."""
        if self.zygote is None or not self._forks(framework):
            return None
        try:
            return ForkedTrainer(self.zygote, framework)
        except ZygoteGone as exc:
            log.info("%s; spawning this trainer", exc)
            return None
        except OSError as exc:
            log.warning("could not fork a spare trainer: %s", exc)
            return None

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
