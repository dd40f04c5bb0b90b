"""Command jobs under the real supervisor, on a real Postgres: the user's own script as the
trainer process, with the SDK (resume bit for bit, OOM backoff) and without it (restart from
scratch, OOM recognised from its output)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from app.domain.spec import JobSpec
from app.settings import Settings
from tests.integration.test_supervisor import (
    IDENTITY,
    events,
    make_due,
    run_in_background,
    submit,
    view,
)
from workers.supervisor import Outcome, Supervisor

COMMANDS = Path(__file__).resolve().parents[1] / "commands"
SDK_SCRIPT = str(COMMANDS / "sdk_train.py")
PLAIN_SCRIPT = str(COMMANDS / "plain_train.py")


@pytest.fixture
def cmd_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"fault_injection": True, "command_jobs": True})


def command_spec(script: str, env: dict[str, str] | None = None, **overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "command": f"python {script}",
        "env": env or {},
        "training": {"batch_size": 256, "seed": 3, "checkpoint_every_steps": 4},
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def output_dir(settings: Settings, job_id: uuid.UUID) -> Path:
    return settings.checkpoint_root / str(job_id) / "output"


def weights(settings: Settings, job_id: uuid.UUID) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(
        output_dir(settings, job_id) / "model.pt", weights_only=True
    )
    return state


def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_killed_sdk_command_resumes_to_the_same_weights_bit_for_bit(
    cmd_settings: Settings,
) -> None:
    # Given the same SDK script submitted twice as command jobs
    baseline_id = submit(cmd_settings, command_spec(SDK_SCRIPT))
    job_id = submit(cmd_settings, command_spec(SDK_SCRIPT, env={"SLOW": "0.2"}))
    # When one runs uninterrupted, and the other is killed with SIGKILL after its second
    # checkpoint
    assert Supervisor(cmd_settings, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    runner, outcome = run_in_background(cmd_settings, job_id, until_step=1)
    wait_for(
        lambda: (view(cmd_settings, job_id)["checkpoint"] or {}).get("step", 0) >= 8,
        "no second checkpoint",
    )
    os.kill(int((output_dir(cmd_settings, job_id) / "pid").read_text()), signal.SIGKILL)
    runner.join(30)
    assert outcome == [Outcome.REQUEUED]
    # And runs again
    make_due(cmd_settings, job_id)
    assert Supervisor(cmd_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    # Then it resumed from a checkpoint, and ends with the uninterrupted run's weights
    resumed = [m for kind, _, m in events(cmd_settings, job_id) if kind == "resumed"]
    assert resumed and "resumed at step 8" in resumed[0]
    a, b = weights(cmd_settings, baseline_id), weights(cmd_settings, job_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    job = view(cmd_settings, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["result"]["final_loss"] == view(cmd_settings, baseline_id)["result"]["final_loss"]


def test_an_sdk_command_out_of_memory_backs_off_to_the_same_loss(cmd_settings: Settings) -> None:
    # Given the SDK script with OOM injected above micro-batch 64, and one without
    faults = {"oom_above_micro_batch": 64}
    job_id = submit(cmd_settings, command_spec(SDK_SCRIPT, faults=faults))
    baseline_id = submit(cmd_settings, command_spec(SDK_SCRIPT))
    # When both run
    assert Supervisor(cmd_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(cmd_settings, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    # Then the first ended at 64 x 4, after two backoffs, with the unhalved run's loss
    job = view(cmd_settings, job_id)
    assert job["batch"] == {"size": 256, "micro_batch": 64, "accumulation": 4}
    backoffs = [m for kind, _, m in events(cmd_settings, job_id) if kind == "oom_backoff"]
    assert len(backoffs) == 2
    baseline = view(cmd_settings, baseline_id)["result"]["final_loss"]
    assert job["result"]["final_loss"] == pytest.approx(baseline, rel=1e-4)


def test_a_command_without_the_sdk_killed_restarts_from_scratch_and_succeeds(
    cmd_settings: Settings,
) -> None:
    # Given a script that knows nothing of gpufleet
    job_id = submit(cmd_settings, command_spec(PLAIN_SCRIPT, env={"SLOW": "0.2", "STEPS": "8"}))
    starts = output_dir(cmd_settings, job_id) / "starts"
    # When it is killed mid-run
    runner, outcome = run_in_background(cmd_settings, job_id, until_step=0)
    wait_for(starts.exists, "the command never started")
    os.kill(int(starts.read_text().split()[0]), signal.SIGKILL)
    runner.join(30)
    assert outcome == [Outcome.REQUEUED]
    # And runs again
    make_due(cmd_settings, job_id)
    assert Supervisor(cmd_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    # Then it started twice from scratch (nothing to resume from) and finished
    lines = starts.read_text().splitlines()
    assert len(lines) == 2 and all(line.endswith("resume_from=''") for line in lines)
    assert (output_dir(cmd_settings, job_id) / "done").read_text() == "ok"
    assert view(cmd_settings, job_id)["status"] == "succeeded"


def test_a_command_printing_torch_oom_and_exiting_1_is_classified_oom(
    cmd_settings: Settings,
) -> None:
    # Given a script that prints PyTorch's out-of-memory error and exits 1, at batch 4
    job = command_spec(PLAIN_SCRIPT, env={"MODE": "oom"}, training={"batch_size": 4})
    job_id = submit(cmd_settings, job)
    # When it runs
    assert Supervisor(cmd_settings, IDENTITY).run(job_id) == Outcome.FAILED
    # Then the micro-batch was halved down to 1, and it failed as oom
    found = view(cmd_settings, job_id)
    assert found["error"]["kind"] == "oom"
    assert "CUDA out of memory" in found["error"]["message"]
    backoffs = [kind for kind, _, _ in events(cmd_settings, job_id) if kind == "oom_backoff"]
    assert len(backoffs) == 2  # 4 -> 2 -> 1


def test_a_command_that_cannot_start_fails_as_a_user_error(cmd_settings: Settings) -> None:
    job_id = submit(cmd_settings, command_spec("x", command=["no-such-program-gpufleet", "-v"]))
    assert Supervisor(cmd_settings, IDENTITY).run(job_id) == Outcome.FAILED
    error = view(cmd_settings, job_id)["error"]
    assert error["kind"] == "user_error" and "no-such-program-gpufleet" in error["message"]


def test_a_worker_without_command_jobs_refuses_one(settings: Settings) -> None:
    job_id = submit(settings, command_spec(PLAIN_SCRIPT))
    assert Supervisor(settings, IDENTITY).run(job_id) == Outcome.FAILED
    assert "GPUFLEET_COMMAND_JOBS" in view(settings, job_id)["error"]["message"]
