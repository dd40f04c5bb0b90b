"""The storage layer against a real S3-speaking server process (moto's server mode, started on a
free port), and a snapshot that goes through it: uploaded by the API, fetched by the worker."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.api.app import create_app
from app.settings import Settings
from app.storage import S3Store, open_store
from tests.integration.test_api import ALICE, AUTH
from tests.integration.test_supervisor import IDENTITY
from tests.s3_server import s3_client, start_moto
from workers.supervisor import Outcome, Supervisor

BUCKET = "gpufleet-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server, url = start_moto()
    try:
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    s3 = settings.model_copy(
        update={
            "storage_url": f"s3://{BUCKET}/fleet",
            "s3_endpoint_url": s3_endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "test",
            "s3_secret_access_key": SecretStr("test"),
        }
    )
    s3_client(s3_endpoint, key="test").create_bucket(Bucket=BUCKET)
    return s3


def test_the_s3_store_puts_gets_and_knows_what_it_lacks(
    s3_settings: Settings, tmp_path: Path
) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, S3Store)
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 1000)
    assert store.size("a/blob") is None and not store.exists("a/blob")
    store.put_file("a/blob", src)
    assert store.size("a/blob") == 1000
    store.get_file("a/blob", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.get_file("a/none", tmp_path / "none")
    assert b"".join(store.read_chunks("a/blob")) == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        b"".join(store.read_chunks("a/none"))
    store.delete("a/blob")
    assert not store.exists("a/blob")
    assert open_store(s3_settings).client is store.client  # one client per process


def test_a_snapshot_travels_through_the_object_store(s3_settings: Settings, tmp_path: Path) -> None:
    # Given a snapshot uploaded through the API into the bucket
    local = tmp_path / "local-store"
    settings = s3_settings.model_copy(update={**AUTH, "command_jobs": True, "storage_root": local})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        script = (
            b"import os, pathlib\n"
            b"pathlib.Path(os.environ['GPUFLEET_OUTPUT_DIR'], 'ok').write_text('s3')\n"
        )
        info = tarfile.TarInfo("run.py")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
    client = TestClient(create_app(settings))
    created = client.post(
        "/v1/snapshots",
        content=raw.getvalue(),
        headers={**ALICE, "Content-Type": "application/octet-stream"},
    )
    assert created.status_code == 201
    job = {"command": ["python", "run.py"], "snapshot": created.json()["id"]}
    job_id = client.post("/v1/jobs", json=job, headers=ALICE).json()["id"]
    # When a worker runs the job
    assert Supervisor(settings, IDENTITY).run(uuid.UUID(job_id)) == Outcome.SUCCEEDED
    # Then the command ran from the snapshot it fetched from the bucket
    assert (settings.checkpoint_root / job_id / "output" / "ok").read_text() == "s3"
    assert not local.exists()
