"""The HTTP API on a real Postgres and Redis: the contract of API.md, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.api.app import create_app, ensure_safe_bind
from app.settings import Settings, SettingsError
from tests.conftest import ROOT
from tests.integration.api_support import ADMIN, ALICE, AUTH, BOB, METRICS, authed_client

JOB = {
    "name": "mlp-demo",
    "framework": "torch",
    "model": {"type": "mlp", "input_dim": 32, "hidden_units": [128, 64], "output_dim": 1},
    "data": {"source": "synthetic", "samples": 20000, "seed": 0},
    "training": {
        "epochs": 3,
        "batch_size": 256,
        "learning_rate": 0.001,
        "seed": 0,
        "checkpoint_every_steps": 50,
        "mixed_precision": False,
    },
    "resources": {"gpu_type": "any", "memory_gb": 8, "gpu_count": 1, "gpu_memory_fraction": 0.9},
    "priority": 5,
    "max_attempts": 3,
}


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return authed_client(settings)


def job_with(**changes: Any) -> dict[str, Any]:
    body = {**JOB}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def error_of(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    message: str = body["error"]["message"]
    return message


def test_submit_then_get_list_and_cancel(client: TestClient, redis_url: str) -> None:
    created = client.post("/v1/jobs", json=JOB, headers=ALICE)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued" and job["queue"] == "gpu.any.8" and job["tenant"] == "alice"
    assert job["batch"] == {"size": 256, "micro_batch": 256, "accumulation": 1}
    assert "no devices are registered" in job["waiting_reason"]
    # The wake-up landed in the job's queue (Redis list named after it; priority 5 -> step 4)
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("gpu.*")}
    assert keys == {"gpu.any.8:4"}
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["id"] == job["id"]
    listed = client.get("/v1/jobs", headers=ALICE).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert again.status_code == 409 and "already cancelled" in error_of(again)
    kinds = [
        e["kind"]
        for e in client.get(f"/v1/jobs/{job['id']}/events", headers=ALICE).json()["events"]
    ]
    assert kinds == ["submitted", "cancelled"]


def test_routing_to_type_and_tier(client: TestClient) -> None:
    body = job_with(resources={"gpu_type": "a100", "memory_gb": 40})
    assert client.post("/v1/jobs", json=body, headers=ALICE).json()["queue"] == "gpu.A100.40"


def test_pagination_newest_first(client: TestClient) -> None:
    ids = [
        client.post("/v1/jobs", json=job_with(name=f"j{i}"), headers=ALICE).json()["id"]
        for i in range(5)
    ]
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=ALICE).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=ALICE).json()
    assert len(queued["jobs"]) == 5


def test_idempotency_key(client: TestClient) -> None:
    headers = {**ALICE, "Idempotency-Key": "nightly-42"}
    first = client.post("/v1/jobs", json=JOB, headers=headers)
    same = client.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == 201 and same.status_code == 200
    assert same.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=job_with(name="other"), headers=headers)
    assert other.status_code == 409 and "different body" in error_of(other)
    # Keys belong to a tenant
    assert (
        client.post(
            "/v1/jobs", json=JOB, headers={**BOB, "Idempotency-Key": "nightly-42"}
        ).status_code
        == 201
    )


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (job_with(colour="red"), 422, "unknown field 'colour'"),
        (job_with(resources={"memory_gb": -4}), 422, "resources.memory_gb"),
        (job_with(framework="jax"), 422, "framework"),
        (
            job_with(
                framework="tensorflow",
                entrypoint="tests.custom_trainers.tf:train",
                resources={"gpu_count": 2},
            ),
            422,
            "a custom TensorFlow trainer of several GPUs is not supported",
        ),
        (job_with(resources={"memory_gb": 500}), 422, "largest GPU tier"),
        (job_with(faults={"oom_above_micro_batch": 64}), 422, "GPUFLEET_FAULT_INJECTION"),
        (job_with(framework=None, entrypoint="evil.module:run"), 422, "not under an allowed"),
        (job_with(framework=None, command="python train.py"), 422, "GPUFLEET_COMMAND_JOBS"),
        (job_with(training={"batch_size": 0}), 422, "training.batch_size"),
        ([1, 2, 3], 422, "body"),
        (job_with(name="a\x00b"), 422, "control character"),
        (job_with(training={"seed": 2**64}), 422, "training.seed"),
    ],
)
def test_bad_input_gets_a_clear_4xx(
    client: TestClient, body: Any, status: int, needle: str
) -> None:
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == status
    assert needle in error_of(response)


def test_command_jobs_where_the_deployment_allows_them(settings: Settings) -> None:
    # Given a deployment that runs command jobs
    client = TestClient(create_app(settings.model_copy(update={**AUTH, "command_jobs": True})))
    # Then a command job is taken, its string split into argv, and a reserved env refused
    body = job_with(framework=None, command="python train.py --lr 3e-4", env={"LR": "1"})
    created = client.post("/v1/jobs", json=body, headers=ALICE)
    assert created.status_code == 201
    assert created.json()["spec"]["command"] == ["python", "train.py", "--lr", "3e-4"]
    bad = job_with(framework=None, command=["python"], env={"CUDA_VISIBLE_DEVICES": "0"})
    refused = client.post("/v1/jobs", json=bad, headers=ALICE)
    assert refused.status_code == 422 and "reserved" in error_of(refused)
    assert client.get("/v1/jobs", headers=ALICE).json()["jobs"][0]["id"] == created.json()["id"]
    # And the OpenAPI document offers 'command' here, and not where they are off
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]
    assert "command" in schema["properties"]
    off = TestClient(create_app(settings.model_copy(update=AUTH)))
    schema = off.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]
    assert "command" not in schema["properties"] and "env" not in schema["properties"]


def test_malformed_json(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}
    )
    assert response.status_code == 422 and "not valid JSON" in error_of(response)


def test_auth_and_tenants(client: TestClient) -> None:
    assert "missing bearer token" in error_of(client.post("/v1/jobs", json=JOB))
    assert client.get("/v1/jobs").status_code == 401
    wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "unknown token" in error_of(wrong)
    job_id = client.post("/v1/jobs", json=JOB, headers=ALICE).json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/logs"):
        response = client.get(path, headers=BOB)
        assert response.status_code == 404 and "not found" in error_of(response)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=BOB).status_code == 404
    assert client.get("/v1/jobs", headers=BOB).json()["jobs"] == []


def test_unknown_and_malformed_ids_and_cursors(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=ALICE).status_code == 404
    assert "not a job id" in error_of(client.get("/v1/jobs/not-a-uuid", headers=ALICE))
    bad = client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=ALICE)
    assert bad.status_code == 422 and "cursor" in error_of(bad)
    bad_status = client.get("/v1/jobs", params={"status": "sleeping"}, headers=ALICE)
    assert bad_status.status_code == 422 and "status" in error_of(bad_status)


def test_validate_devices_fleet_and_ops(client: TestClient) -> None:
    verdict = client.post("/v1/jobs/validate", json=JOB, headers=ALICE).json()
    assert (
        verdict["valid"]
        and verdict["fits"] == []
        and "no registered device" in (verdict["waiting_reason"])
    )
    assert client.get("/v1/devices", headers=ALICE).json() == {"devices": []}
    fleet = client.get("/v1/fleet", headers=ALICE).json()
    assert fleet["devices"]["registered"] == 0 and "queued" in fleet["jobs"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    client.post("/v1/jobs", json=JOB, headers=ALICE)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=ALICE).status_code == 403
    assert client.get("/metrics", headers=ADMIN).status_code == 200
    metrics = client.get("/metrics", headers=METRICS).text
    assert 'gpufleet_jobs{status="queued"} 1.0' in metrics
    assert 'gpufleet_queue_depth{queue="gpu.any.8"} 1.0' in metrics


def test_readyz_names_the_part_that_is_down(settings: Settings) -> None:
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    response = TestClient(create_app(broken)).get("/readyz")
    assert response.status_code == 503 and "broker" in error_of(response)


def test_no_tokens_means_tenant_default_on_loopback_only(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    assert client.post("/v1/jobs", json=JOB).json()["tenant"] == "default"
    ensure_safe_bind("127.0.0.1", settings)
    with pytest.raises(SettingsError, match="loopback only"):
        ensure_safe_bind("0.0.0.0", settings)
    ensure_safe_bind("0.0.0.0", settings.model_copy(update={"api_tokens": "a:b"}))


def test_the_api_imports_no_worker_code_or_frameworks() -> None:
    code = (
        "import sys, app.api.app, app.cli; "
        "bad = [m for m in ('workers', 'torch', 'tensorflow') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_api_freezes_its_startup_heap_when_it_starts(settings: Settings) -> None:
    """Full collections no longer traverse the imports and the app (app/api/heap.py)."""
    code = (
        "import gc, sys, json; from fastapi.testclient import TestClient; "
        "from app.api.app import create_app; from app.settings import Settings; "
        "app = create_app(Settings.model_validate_json(sys.argv[1])); "
        "before = (gc.get_freeze_count(), gc.get_threshold()[0]); "
        "client = TestClient(app); client.__enter__(); "
        "print(json.dumps([before, (gc.get_freeze_count(), gc.get_threshold()[0])]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, settings.model_dump_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [0, 700]
    assert after[0] > 50_000 and after[1] == 5_000


def test_a_job_no_device_could_run_is_accepted_and_says_why(
    client: TestClient, settings: Settings
) -> None:
    from app.db.devices import register_devices
    from app.db.session import session_scope
    from tests.conftest import device_record

    t4 = device_record("GPU-t4", gpu_type="T4", gib=15, simulated=False)
    with session_scope(settings.database_url) as s:
        register_devices(session=s, devices=[t4])
    big = client.post("/v1/jobs", json=job_with(resources={"memory_gb": 40}), headers=ALICE)
    assert big.status_code == 201
    assert "no registered device fits gpu_type=any memory_gb=40" in big.json()["waiting_reason"]
    assert "T4:15GiB" in big.json()["waiting_reason"]
    small = client.post("/v1/jobs/validate", json=JOB, headers=ALICE).json()
    assert [d["uuid"] for d in small["fits"]] == ["GPU-t4"] and small["waiting_reason"] is None
    listed = client.get("/v1/jobs", headers=ALICE).json()["jobs"]
    assert listed[0]["waiting_reason"] == big.json()["waiting_reason"]


def test_live_streams_end_when_the_job_has_ended(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=JOB, headers=ALICE).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)
    stream = client.get(
        f"/v1/jobs/{job_id}/events", headers={**ALICE, "Accept": "text/event-stream"}
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: submitted" in stream.text and "event: cancelled" in stream.text
    logs = client.get(f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, headers=ALICE)
    assert logs.status_code == 200 and logs.text == ""


def test_a_misspelt_query_parameter_is_a_422_naming_it_not_an_unfiltered_answer(
    client: TestClient,
) -> None:
    response = client.get("/v1/jobs?stauts=queued", headers=ALICE)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "'stauts'" in message and "status" in message and "limit" in message
    assert client.get("/v1/jobs?status=queued", headers=ALICE).status_code == 200
    assert client.get("/v1/devices?verbose=1", headers=ALICE).status_code == 422
