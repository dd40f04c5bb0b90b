"""Code snapshots through the API and the CLI, on a real Postgres and a real local store: upload
once per content and tenant, refuse bad archives with nothing stored, and run a command job from
a ``submit --workdir`` snapshot under the real supervisor."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.integration.api_support import serve
from tests.integration.test_api import ALICE, AUTH, BOB, error_of
from tests.integration.test_cli_user import gpufleet
from tests.integration.test_supervisor import IDENTITY
from workers.supervisor import Outcome, Supervisor

COMMAND_JOB = {"command": "python train.py --greeting hello", "training": {"batch_size": 8}}


@pytest.fixture
def snap_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            **AUTH,
            "command_jobs": True,
            "storage_root": tmp_path / "store",
            "snapshot_max_bytes": 4096,
        }
    )


@pytest.fixture
def client(snap_settings: Settings) -> Iterator[TestClient]:
    yield TestClient(create_app(snap_settings))


def tar_gz(*files: tuple[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
    return raw.getvalue()


def upload(client: TestClient, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    response = client.post(
        "/v1/snapshots",
        content=body,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    return response.status_code, response.json()


def stored(settings: Settings) -> list[Path]:
    return [p for p in settings.storage_root.rglob("*") if p.is_file()]


def test_a_snapshot_is_stored_once_per_content_and_tenant(
    client: TestClient, snap_settings: Settings
) -> None:
    body = tar_gz(("train.py", b"print('hi')\n"))
    digest = hashlib.sha256(body).hexdigest()
    assert upload(client, body, ALICE) == (201, {"id": digest, "size": len(body)})
    assert upload(client, body, ALICE)[0] == 200
    assert client.get(f"/v1/snapshots/{digest}", headers=ALICE).json()["size"] == len(body)
    assert len(stored(snap_settings)) == 1
    # Another tenant neither sees it nor may name it in a job
    assert client.get(f"/v1/snapshots/{digest}", headers=BOB).status_code == 404
    job = {**COMMAND_JOB, "snapshot": digest}
    refused = client.post("/v1/jobs", json=job, headers=BOB)
    assert refused.status_code == 404 and "upload it first" in error_of(refused)
    assert client.post("/v1/jobs", json=job, headers=ALICE).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"\x1f\x8b" + bytes(5000), 413, "GPUFLEET_SNAPSHOT_MAX_BYTES"),
        (tar_gz(("../x", b"x")), 422, "'..'"),
        (tar_gz(("/tmp/x", b"x")), 422, "absolute"),
        (tar_gz(("a.py", b"x"), link=("out", "../../etc/passwd")), 422, "outside the snapshot"),
        (b"not a tarball", 422, "not a readable tar.gz"),
    ],
    ids=["oversize", "dotdot", "absolute", "link-out", "not-a-tar"],
)
def test_bad_snapshots_are_refused_and_nothing_is_stored(
    client: TestClient, snap_settings: Settings, body: bytes, status: int, needle: str
) -> None:
    code, answer = upload(client, body, ALICE)
    assert code == status and needle in str(answer)
    assert stored(snap_settings) == []


def test_an_unknown_snapshot_id_is_a_404_and_a_malformed_one_a_422(client: TestClient) -> None:
    unknown = client.post("/v1/jobs", json={**COMMAND_JOB, "snapshot": "a" * 64}, headers=ALICE)
    assert unknown.status_code == 404 and "not found" in error_of(unknown)
    malformed = client.post("/v1/jobs", json={**COMMAND_JOB, "snapshot": "../x"}, headers=ALICE)
    assert malformed.status_code == 422 and "snapshot" in error_of(malformed)


def test_submit_workdir_runs_the_command_from_its_snapshot(
    snap_settings: Settings, tmp_path: Path
) -> None:
    # Given a working directory with a script, a module it imports, and a file it ignores
    work = tmp_path / "project"
    (work / "lib").mkdir(parents=True)
    (work / "lib" / "__init__.py").write_text("")
    (work / "lib" / "words.py").write_text("def shout(s):\n    return s.upper()\n")
    (work / "train.py").write_text(
        "import os, pathlib, sys\n"
        "from lib.words import shout\n"
        "out = pathlib.Path(os.environ['GPUFLEET_OUTPUT_DIR'])\n"
        "listing = sorted(p.name for p in pathlib.Path('.').iterdir())\n"
        "(out / 'said.txt').write_text(shout(sys.argv[2]) + ' ' + ','.join(listing))\n"
    )
    (work / "secret.env").write_text("TOKEN=x")
    (work / ".gpufleetignore").write_text("secret.env\n")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(COMMAND_JOB))
    local = snap_settings.model_copy(update={"api_tokens": "", "admin_tokens": ""})
    with serve(create_app(local)) as url:
        # When it is submitted twice with --workdir
        code, out, err = gpufleet(url, "submit", str(tmp_path / "job.yaml"), "--workdir", str(work))
        assert code == 0, err
        again = gpufleet(url, "submit", str(tmp_path / "job.yaml"), "--workdir", str(work))
    # Then the snapshot was uploaded once
    assert "uploaded" in err and "already uploaded" in again[2]
    assert len(stored(local)) == 1
    # And the command runs in the unpacked snapshot, importing its own module
    job_id = uuid.UUID(out.strip())
    assert Supervisor(local, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    said = (local.checkpoint_root / str(job_id) / "output" / "said.txt").read_text()
    assert said == "HELLO .gpufleetignore,lib,train.py"
