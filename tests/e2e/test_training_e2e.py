"""Training that survives, end to end: exact resume after kill -9, both frameworks side by side,
custom entrypoints."""

from __future__ import annotations

import signal

import pytest

from tests.e2e.fleet import Fleet, Proc, small_job, wait_for

pytestmark = pytest.mark.e2e


def _kill_after_second_checkpoint(fleet: Fleet, workers: dict[str, Proc], job_id: str) -> None:
    wait_for(
        lambda: (fleet.job(job_id)["checkpoint"] or {}).get("step", 0) >= 20,
        timeout=120,
        what="the second checkpoint",
    )
    fleet.holder(job_id, workers).signal_tree(signal.SIGKILL)


@pytest.mark.parametrize(
    "framework", ["torch", pytest.param("tensorflow", marks=pytest.mark.tensorflow)]
)
def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(fleet: Fleet, framework: str) -> None:
    # Given a job killed with SIGKILL right after its second checkpoint
    workers = fleet.start_two_a100s()
    training = {"epochs": 4, "checkpoint_every_steps": 10}
    job_id = fleet.submit(
        small_job(framework=framework, training=training, faults={"step_delay_s": 0.1})
    )
    _kill_after_second_checkpoint(fleet, workers, job_id)
    # And the same job run without interruption
    reference_id = fleet.submit(small_job(framework=framework, training=training))
    final = fleet.wait_final([job_id, reference_id], timeout=240)
    resumed, reference = final[job_id], final[reference_id]
    # Then the resumed run finished on the other worker with the same final weights
    assert resumed["status"] == reference["status"] == "succeeded"
    assert resumed["attempts"] == 2
    events = fleet.get(f"/v1/jobs/{job_id}/events")["events"]
    assert any(e["kind"] == "resumed" for e in events)
    assert resumed["result"]["weights_sha256"] == reference["result"]["weights_sha256"]
    assert resumed["result"]["final_loss"] == reference["result"]["final_loss"]


@pytest.mark.tensorflow
def test_tensorflow_and_torch_jobs_run_side_by_side(fleet: Fleet) -> None:
    fleet.start_two_a100s()
    tf_job = fleet.submit(small_job(framework="tensorflow", faults={"step_delay_s": 0.05}))
    torch_job = fleet.submit(small_job(framework="torch", faults={"step_delay_s": 0.05}))
    final = fleet.wait_final([tf_job, torch_job], timeout=240)
    assert final[tf_job]["status"] == final[torch_job]["status"] == "succeeded"
    devices = {final[j]["leases"][0]["device"] for j in (tf_job, torch_job)}
    assert len(devices) == 2, "each ran on its own worker"


def test_a_custom_entrypoint_trains_and_resumes_like_a_built_in(fleet: Fleet) -> None:
    # Given a custom trainer killed with SIGKILL right after its second checkpoint
    workers = fleet.start_two_a100s()
    custom = {"framework": None, "entrypoint": "tests.custom_trainers.toy:train"}
    training = {"max_steps": 60, "checkpoint_every_steps": 10}
    job_id = fleet.submit(small_job(**custom, training=training, faults={"step_delay_s": 0.1}))
    _kill_after_second_checkpoint(fleet, workers, job_id)
    reference_id = fleet.submit(small_job(**custom, training=training))
    final = fleet.wait_final([job_id, reference_id], timeout=240)
    resumed, reference = final[job_id], final[reference_id]
    # Then it resumed on the other worker through the same TrainContext, to the same weights
    assert resumed["status"] == reference["status"] == "succeeded", resumed["error"]
    assert resumed["attempts"] == 2
    events = fleet.get(f"/v1/jobs/{job_id}/events")["events"]
    assert any(e["kind"] == "resumed" for e in events)
    assert resumed["result"]["weights_sha256"] == reference["result"]["weights_sha256"]
    logs = fleet.get(f"/v1/jobs/{job_id}/logs")
    assert logs["text"] or logs["logs"]
