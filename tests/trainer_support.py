"""Run a trainer the way the supervisor does: a real subprocess, a control pipe, stdin for stop.

No database: the messages are collected and returned with the exit code.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.domain.spec import JobSpec
from workers.trainers.protocol import (
    CONTROL_FD_ENV,
    CheckpointSaved,
    CheckpointSkipped,
    Failure,
    Launch,
    Message,
    Result,
    Resumed,
    decode,
)

ROOT = Path(__file__).resolve().parents[1]
M = TypeVar("M")

#: A small job: 2000 rows, batch 64 (32 steps an epoch), 3 epochs = 96 steps, ~1 s on a CPU.
SMALL_SPEC: dict[str, Any] = {
    "name": "small",
    "framework": "torch",
    "model": {"input_dim": 16, "hidden_units": [32], "output_dim": 1, "task": "regression"},
    "data": {"source": "synthetic", "samples": 2000, "seed": 3},
    "training": {
        "epochs": 3,
        "batch_size": 64,
        "learning_rate": 0.01,
        "seed": 7,
        "checkpoint_every_steps": 20,
    },
}


def spec(**overrides: Any) -> JobSpec:
    """SMALL_SPEC with top-level keys replaced or, for dicts, merged one level deep."""
    data = copy.deepcopy(SMALL_SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return JobSpec.model_validate(data)


def launch(
    tmp_path: Path,
    job_spec: JobSpec,
    *,
    epoch: int = 1,
    attempt: int = 1,
    resume_from: list[Path] | None = None,
    micro_batch: int | None = None,
    fault_injection: bool = True,
    entrypoint_prefixes: tuple[str, ...] = (),
    job_id: str = "job1",
) -> Launch:
    return Launch(
        job_id=job_id,
        epoch=epoch,
        attempt=attempt,
        spec=job_spec,
        checkpoint_dir=tmp_path / "checkpoints" / job_id,
        resume_from=resume_from or [],
        micro_batch=micro_batch or job_spec.training.batch_size,
        data_root=tmp_path / "data",
        fault_injection=fault_injection,
        entrypoint_prefixes=entrypoint_prefixes,
    )


@dataclass
class Outcome:
    code: int
    messages: list[Message] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""

    def of(self, kind: type[M]) -> list[M]:
        return [m for m in self.messages if isinstance(m, kind)]

    @property
    def result(self) -> Result:
        results = self.of(Result)
        assert results, f"no result (exit {self.code}): {self.messages}\n{self.stderr}"
        return results[-1]

    @property
    def failure(self) -> Failure:
        failures = self.of(Failure)
        assert failures, f"no failure (exit {self.code}): {self.messages}\n{self.stderr}"
        return failures[-1]

    @property
    def checkpoints(self) -> list[CheckpointSaved]:
        return self.of(CheckpointSaved)

    @property
    def skipped(self) -> list[CheckpointSkipped]:
        return self.of(CheckpointSkipped)

    @property
    def resumed(self) -> list[Resumed]:
        return self.of(Resumed)

    def newest_first(self) -> list[Path]:
        return [Path(m.path) for m in reversed(self.checkpoints)]


class Trainer:
    """A started trainer process; ``stop()``, ``kill()``, ``send_signal()`` act on it."""

    def __init__(
        self,
        the_launch: Launch,
        workdir: Path,
        raw_json: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.launch_path = workdir / f"launch-e{the_launch.epoch}-a{the_launch.attempt}.json"
        if raw_json is None:
            the_launch.dump(self.launch_path)
        else:  # a launch the supervisor would never write, to test the trainer's own checks
            self.launch_path.write_text(raw_json)
        self.stdout_path = self.launch_path.with_suffix(".out")
        self.stderr_path = self.launch_path.with_suffix(".err")
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            CONTROL_FD_ENV: str(write_fd),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.trainers.main", str(self.launch_path)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                pass_fds=(write_fd,),
                env=env,
                cwd=ROOT,
            )
        os.close(write_fd)
        self._control = os.fdopen(read_fd, "rb")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def collect(
        self, on_message: Callable[[Message, Trainer], None] | None = None, timeout: float = 120
    ) -> Outcome:
        messages: list[Message] = []
        try:
            for line in self._control:  # until the trainer exits (or dies) and the pipe closes
                message = decode(line)
                messages.append(message)
                if on_message is not None:
                    on_message(message, self)
            code = self.proc.wait(timeout=timeout)
        finally:
            self._control.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        return Outcome(
            code=code,
            messages=messages,
            stdout=self.stdout_path.read_text(errors="replace"),
            stderr=self.stderr_path.read_text(errors="replace"),
        )


def run_trainer(
    the_launch: Launch,
    workdir: Path,
    on_message: Callable[[Message, Trainer], None] | None = None,
) -> Outcome:
    return Trainer(the_launch, workdir).collect(on_message)
