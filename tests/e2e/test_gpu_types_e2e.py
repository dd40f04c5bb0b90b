"""A job that names alternative GPU types runs on whichever frees first, once."""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Fleet, small_job, wait_for

pytestmark = pytest.mark.e2e


def test_a_job_with_alternative_types_runs_on_either_once(fleet: Fleet) -> None:
    # Given an A100 worker on host-a and a T4 worker on host-b
    fleet.start_a100_and_t4()
    devices = {d["uuid"]: d["type"] for d in fleet.get("/v1/devices")["devices"]}
    spec = small_job(
        resources={"gpu_type": ["v100", "T4", "A100"], "memory_gb": 8},
        faults={"step_delay_s": 0.05},
    )
    # When two such jobs are submitted together (each one wakes both workers)
    first = fleet.submit({**spec, "name": "alt-0"})
    wait_for(lambda: fleet.job(first)["status"] == "running", timeout=60)
    second = fleet.submit({**spec, "name": "alt-1"})
    final = fleet.wait_final([first, second], timeout=120)
    # Then each ran exactly once (one lease), and the second took the other type while the
    # first held its device: either type serves the job
    assert all(j["status"] == "succeeded" for j in final.values())
    assert [len(j["leases"]) for j in final.values()] == [1, 1]
    used = {devices[j["leases"][0]["device"]] for j in final.values()}
    assert used == {"A100", "T4"}
    assert final[first]["spec"]["resources"]["gpu_type"] == ["V100", "T4", "A100"]
