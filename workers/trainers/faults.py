"""Fault injection for drills and tests: every injected fault lives here and nowhere else.

Active only when the worker allows it (``Launch.fault_injection``, from
``GPUFLEET_FAULT_INJECTION=1``) *and* the spec asks for it (``spec.faults``); otherwise every
hook is a no-op, so production trainers can call them unconditionally.

- ``oom_above_micro_batch``: every step raises the framework's real out-of-memory exception
  while the micro-batch is larger than this, exactly as a too-large batch on a real GPU would.
- ``fail_at_step`` + ``fail_with``: the step with that number (1-based) raises
  :class:`InjectedTransientError` (an ``OSError``: infra, retried), ``ValueError`` (user
  error) or, for ``gpu_fault``, the ``RuntimeError`` CUDA raises on an uncorrectable ECC error
  (infra, device suspect), only in the job's first attempt, so that a retry gets past it.
- ``step_delay_s``: sleep after each step, so that tests can stop or kill a run mid-way.
"""

from __future__ import annotations

import time
from typing import Literal

from app.domain.spec import FaultSpec
from workers.trainers.errors import InjectedTransientError
from workers.trainers.protocol import Launch

Framework = Literal["torch", "tensorflow"]


class Faults:
    def __init__(self, spec: FaultSpec | None, *, attempt: int, framework: Framework) -> None:
        self.spec = spec
        self.attempt = attempt
        self.framework = framework

    @classmethod
    def for_launch(cls, launch: Launch) -> Faults:
        spec = launch.spec.faults if launch.fault_injection else None
        framework: Framework = "tensorflow" if launch.spec.framework == "tensorflow" else "torch"
        return cls(spec, attempt=launch.attempt, framework=framework)

    @property
    def active(self) -> bool:
        return self.spec is not None

    def check_step(self, step: int, micro_batch: int) -> None:
        """Call before optimizer step ``step`` (1-based) runs with this micro-batch."""
        if self.spec is None:
            return
        limit = self.spec.oom_above_micro_batch
        if limit is not None and micro_batch > limit:
            raise self._oom(micro_batch, limit)
        if self.spec.fail_at_step == step and self.attempt == 1:
            if self.spec.fail_with == "transient":
                raise InjectedTransientError(f"injected transient fault at step {step}")
            if self.spec.fail_with == "gpu_fault":
                raise RuntimeError(
                    "CUDA error: uncorrectable ECC error encountered "
                    f"(injected GPU fault at step {step})"
                )
            raise ValueError(f"injected error at step {step}")

    def after_step(self) -> None:
        if self.spec is not None and self.spec.step_delay_s > 0:
            time.sleep(self.spec.step_delay_s)

    def _oom(self, micro_batch: int, limit: int) -> Exception:
        what = f"micro-batch {micro_batch} > oom_above_micro_batch {limit}"
        if self.framework == "tensorflow":
            import tensorflow as tf

            error: Exception = tf.errors.ResourceExhaustedError(
                None, None, f"OOM (injected: {what})"
            )
            return error
        import torch

        return torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {what})")
