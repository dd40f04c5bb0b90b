"""An entrypoint job whose code comes in its snapshot: unpacked, put on ``PYTHONPATH``, and
imported by the real trainer process (any module name: it is the submitter's code, allowed
where command jobs are), and its final model back as an artifact."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.integration.api_support import ALICE, AUTH
from tests.integration.test_snapshots_api import tar_gz, upload
from tests.integration.test_supervisor import IDENTITY
from workers.supervisor import Outcome, Supervisor

TOY = Path(__file__).resolve().parents[1] / "custom_trainers" / "toy.py"


def test_an_entrypoint_from_the_jobs_snapshot_trains(settings: Settings, tmp_path: Path) -> None:
    # Given a snapshot with a package of the user's own, not on any allow-list
    snap = settings.model_copy(
        update={**AUTH, "command_jobs": True, "storage_root": tmp_path / "store"}
    )
    client = TestClient(create_app(snap))
    status, body = upload(
        client, tar_gz(("mytrain/__init__.py", b""), ("mytrain/toy.py", TOY.read_bytes())), ALICE
    )
    assert status == 201, body
    job = {
        "entrypoint": "mytrain.toy:train",
        "snapshot": body["id"],
        "model": {"input_dim": 8, "hidden_units": [16], "output_dim": 1},
        "data": {"samples": 256, "seed": 0},
        "training": {"epochs": 1, "batch_size": 64, "checkpoint_every_steps": 2},
    }
    created = client.post("/v1/jobs", json=job, headers=ALICE)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # When a worker runs it
    assert Supervisor(snap, IDENTITY).run(uuid.UUID(job_id)) == Outcome.SUCCEEDED
    # Then it trained with the snapshot's code and its model is an artifact
    done = client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    assert done["status"] == "succeeded", done
    listed = client.get(f"/v1/jobs/{job_id}/artifacts", headers=ALICE).json()["artifacts"]
    model = Path(done["result"]["model_path"]).name
    assert [a["name"] for a in listed] == [model]
    streamed = client.get(f"/v1/jobs/{job_id}/artifacts/{model}", headers=ALICE)
    assert streamed.status_code == 200
    assert streamed.headers["x-checksum-sha256"] == listed[0]["sha256"]


def test_an_entrypoint_snapshot_is_refused_where_command_jobs_are_off(settings: Settings) -> None:
    client = TestClient(create_app(settings.model_copy(update=AUTH)))
    job = {"entrypoint": "mytrain.toy:train", "snapshot": "a" * 64}
    refused = client.post("/v1/jobs", json=job, headers=ALICE)
    assert refused.status_code == 422 and "GPUFLEET_COMMAND_JOBS" in refused.text
