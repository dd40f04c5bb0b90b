"""Workers say what they can run: a TensorFlow job never goes to a worker without TensorFlow."""

from __future__ import annotations

import time

import pytest

from tests.e2e.fleet import Fleet, small_job

pytestmark = [pytest.mark.e2e, pytest.mark.tensorflow]


def test_a_tensorflow_job_waits_for_a_worker_that_has_tensorflow(fleet: Fleet) -> None:
    # Given a fleet whose only worker offers torch (TensorFlow hidden by the setting)
    fleet.start_api()
    fleet.start_reaper()
    torch_only = fleet.start_worker(
        "worker-torch",
        fake_gpus="A100:80",
        host="host-a",
        env={"GPUFLEET_WORKER_FRAMEWORKS": "torch"},
    )
    fleet.wait_workers_ready(1)
    (device,) = fleet.get("/v1/devices")["devices"]
    assert list(device["frameworks"]) == ["torch"]
    # When a TensorFlow job and a torch job are submitted
    tf_job = fleet.submit(small_job(framework="tensorflow"))
    torch_job = fleet.submit(small_job())
    # Then the torch job runs there, and the TensorFlow job waits, saying why
    done = fleet.wait_final([torch_job], timeout=120)
    assert done[torch_job]["status"] == "succeeded"
    time.sleep(4)  # past the reaper's redispatch: the wake-up is sent again, still not taken
    waiting = fleet.job(tf_job)
    assert waiting["status"] == "queued" and waiting["leases"] == []
    assert waiting["queue"] == "gpu.any.8.tensorflow"
    assert "framework 'tensorflow'" in waiting["waiting_reason"]
    claimed = next(line for line in torch_only.log().splitlines() if "; consuming " in line)
    assert ".tensorflow" not in claimed
    # When a worker that has TensorFlow joins
    fleet.start_worker("worker-tf", fake_gpus="A100:80", host="host-b")
    # Then it runs the TensorFlow job
    final = fleet.wait_final([tf_job], timeout=180)[tf_job]
    assert final["status"] == "succeeded", final["error"]
    assert [lease["worker"].rsplit("@", 1)[1] for lease in final["leases"]] == ["host-b"]
