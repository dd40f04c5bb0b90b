"""Submit-time rules for GPU types and counts, against registered hosts: a fleet of one host
with 4 A100s and one with 2 T4s, as workers register them."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.db.devices import register_devices
from app.db.session import session_scope
from app.settings import Settings
from tests.conftest import device_record
from tests.integration.test_api import ALICE, AUTH, error_of, job_with


@pytest.fixture
def client(settings: Settings) -> TestClient:
    devices = [
        dataclasses.replace(device_record(f"GPU-a{i}", index=i), host="host-4") for i in range(4)
    ] + [
        dataclasses.replace(
            device_record(f"GPU-t{i}", index=i, gpu_type="T4", gib=15), host="host-2"
        )
        for i in range(2)
    ]
    with session_scope(settings.database_url) as s:
        register_devices(session=s, devices=devices)
    return TestClient(create_app(settings.model_copy(update=AUTH)))


def test_more_gpus_than_any_host_has_is_a_422_naming_multi_host(client: TestClient) -> None:
    # When a job asks for 8 GPUs on a fleet whose largest host has 4
    for path in ("/v1/jobs", "/v1/jobs/validate"):
        response = client.post(path, json=job_with(resources={"gpu_count": 8}), headers=ALICE)
        # Then it is refused at once, saying why and what the fleet has
        assert response.status_code == 422
        message = error_of(response)
        assert "gpu_count 8 is more than any one host has" in message
        assert "largest has 4" in message and "host-4" in message
        assert "multi-host jobs are not supported" in message
    # And the count is of the GPUs that fit: 3 T4s are more than host-2's 2
    t4 = job_with(resources={"gpu_count": 3, "gpu_type": "T4"})
    assert "largest has 2 GPUs that fit gpu_type=T4" in error_of(
        client.post("/v1/jobs", json=t4, headers=ALICE)
    )


def test_a_gang_one_host_could_hold_is_accepted_as_distributed(client: TestClient) -> None:
    # A gang of 4 fits host-4: accepted, distributed training implied
    response = client.post("/v1/jobs", json=job_with(resources={"gpu_count": 4}), headers=ALICE)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["distributed_training"] is True
    # The built-in TensorFlow trainer takes several GPUs too (MirroredStrategy)...
    tf = job_with(framework="tensorflow", resources={"gpu_count": 2})
    accepted = client.post("/v1/jobs", json=tf, headers=ALICE)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["spec"]["distributed_training"] is True
    # ...a custom TensorFlow trainer does not: a clear 422
    custom = {**tf, "entrypoint": "tests.custom_trainers.tf:train"}
    refused = client.post("/v1/jobs", json=custom, headers=ALICE)
    assert refused.status_code == 422
    assert "a custom TensorFlow trainer of several GPUs is not supported" in error_of(refused)


def test_validate_speaks_of_the_alternatives(client: TestClient) -> None:
    # A job that can use a V100 or a T4 fits the T4s only, and waits in both types' queues
    either = client.post(
        "/v1/jobs/validate", json=job_with(resources={"gpu_type": ["V100", "t4"]}), headers=ALICE
    ).json()
    assert sorted(d["uuid"] for d in either["fits"]) == ["GPU-t0", "GPU-t1"]
    assert either["queue"] == "gpu.V100.8 gpu.T4.8" and either["waiting_reason"] is None
    # A job whose alternatives are all missing says so, naming them all
    neither = client.post(
        "/v1/jobs/validate", json=job_with(resources={"gpu_type": ["V100", "A10"]}), headers=ALICE
    ).json()
    assert neither["fits"] == []
    assert "no registered device fits gpu_type=V100 or A10" in neither["waiting_reason"]
    # And a submitted one stores its list and shows the same reason
    job = client.post(
        "/v1/jobs", json=job_with(resources={"gpu_type": ["V100", "A10"]}), headers=ALICE
    ).json()
    assert job["spec"]["resources"]["gpu_type"] == ["V100", "A10"]
    assert "gpu_type=V100 or A10" in job["waiting_reason"]
