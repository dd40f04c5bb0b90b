"""Checkpoints and artifacts that leave the host, through a real S3-speaking server (moto's
server mode, a process of its own): two simulated hosts with separate local directories, the
real supervisor and trainers, the real API and CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import torch
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from app.api.app import create_app
from app.cli import cli
from app.db import leases
from app.db.jobs import job_view
from app.db.session import session_scope
from app.settings import Settings
from app.storage import open_store
from tests.integration.api_support import ALICE, AUTH, BOB, serve
from tests.integration.test_command_jobs import COMMANDS, wait_for
from tests.integration.test_storage_s3 import BUCKET, s3_endpoint, s3_settings  # noqa: F401
from tests.integration.test_supervisor import (
    IDENTITY,
    events,
    make_due,
    spec,
    submit,
)
from workers.checkpoint_sync import CheckpointSync, checkpoint_key
from workers.lease_writer import LeaseLost, LeaseWriter
from workers.supervisor import Outcome, Supervisor

cli_runner = CliRunner()


def host(settings: Settings, root: Path, name: str) -> Settings:
    """A simulated host: its own checkpoint and storage directories, the shared bucket."""
    return settings.model_copy(
        update={
            **AUTH,
            "command_jobs": True,
            "fault_injection": True,
            "checkpoint_root": root / name / "checkpoints",
            "storage_root": root / name / "storage",
        }
    )


def view(settings: Settings, job_id: uuid.UUID, tenant: str) -> dict[str, Any]:
    with session_scope(settings.database_url) as s:
        return job_view(session=s, tenant=tenant, job_id=job_id)


def recorded(settings: Settings, job_id: uuid.UUID) -> list[Any]:
    with session_scope(settings.database_url) as s:
        return list(
            s.execute(
                text(
                    "SELECT step, sha256, storage_key FROM checkpoints WHERE job_id = :j"
                    " ORDER BY step"
                ),
                {"j": job_id},
            ).all()
        )


def bucket_keys(endpoint: str) -> set[str]:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def gpufleet(api_url: str, *args: str) -> str:
    env = {"GPUFLEET_API_URL": api_url, "GPUFLEET_TOKEN": "alice-token"}
    result = cli_runner.invoke(cli, list(args), env=env)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


def test_a_killed_command_job_resumes_on_another_host_from_the_object_store(
    s3_settings: Settings,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    host_a, host_b = host(s3_settings, tmp_path, "a"), host(s3_settings, tmp_path, "b")
    # Given a working directory with a PyTorch script that uses the SDK, submitted twice with
    # the CLI (one snapshot, uploaded once): a job slowed down, and its uninterrupted baseline
    workdir = tmp_path / "project"
    workdir.mkdir()
    shutil.copy(COMMANDS / "sdk_train.py", workdir / "train.py")
    training = {"batch_size": 256, "seed": 3, "checkpoint_every_steps": 4}
    specs = {}
    for name, env in (("job", {"SLOW": "0.2"}), ("baseline", {})):
        specs[name] = tmp_path / f"{name}.yaml"
        body = {"command": "python train.py", "env": env, "training": training}
        specs[name].write_text(yaml.safe_dump(body))
    with serve(create_app(host_a)) as api_url:
        ids = {
            name: uuid.UUID(
                gpufleet(api_url, "submit", str(path), "--workdir", str(workdir)).strip()
            )
            for name, path in specs.items()
        }
        job_id, baseline_id = ids["job"], ids["baseline"]
        # When the job is killed with SIGKILL on host A after its second checkpoint
        runner, outcome = run_in_background_as(host_a, job_id)
        wait_for(lambda: len(recorded(host_a, job_id)) >= 2, "no second checkpoint")
        pid = (host_a.checkpoint_root / str(job_id) / "output" / "pid").read_text()
        os.kill(int(pid), signal.SIGKILL)
        runner.join(60)
        assert outcome == [Outcome.REQUEUED]
        # and host A's disk is gone; host B resumes it, and runs the baseline
        shutil.rmtree(tmp_path / "a")
        make_due(host_b, job_id)
        assert Supervisor(host_b, IDENTITY).run(job_id) == Outcome.SUCCEEDED
        assert Supervisor(host_b, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
        # Then it resumed from its second checkpoint, downloaded from the bucket
        resumed = [m for kind, _, m in events(host_b, job_id) if kind == "resumed"]
        assert resumed and "resumed at step 8" in resumed[0], resumed
        rows = recorded(host_b, job_id)
        assert rows and all(r.storage_key and len(r.sha256) == 64 for r in rows)
        assert {f"fleet/{r.storage_key}" for r in rows} <= bucket_keys(s3_endpoint)
        # and ends with the uninterrupted run's weights, bit for bit
        out_b = host_b.checkpoint_root
        a = torch.load(out_b / str(baseline_id) / "output" / "model.pt", weights_only=True)
        b = torch.load(out_b / str(job_id) / "output" / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # And its artifact, downloaded with the CLI, has the recorded sha256
        listed = {
            a["name"]: a
            for a in httpx.get(f"{api_url}/v1/jobs/{job_id}/artifacts", headers=ALICE).json()[
                "artifacts"
            ]
        }
        assert set(listed) == {"model.pt", "pid"}
        gpufleet(api_url, "artifacts", str(job_id)[:8], "--download", str(tmp_path / "dl"))
        got = hashlib.sha256((tmp_path / "dl" / "model.pt").read_bytes()).hexdigest()
        assert got == listed["model.pt"]["sha256"]
        assert (
            got
            == hashlib.sha256(
                (out_b / str(job_id) / "output" / "model.pt").read_bytes()
            ).hexdigest()
        )
        # and another tenant's request is a 404, a name with '..' too (before any lookup)
        other = httpx.get(f"{api_url}/v1/jobs/{job_id}/artifacts/model.pt", headers=BOB)
        assert other.status_code == 404
        assert httpx.get(f"{api_url}/v1/jobs/{job_id}/artifacts", headers=BOB).status_code == 404
        dotted = httpx.get(f"{api_url}/v1/jobs/{job_id}/artifacts/a/%2E%2E/pid", headers=ALICE)
        assert dotted.status_code == 404 and "no '..'" in dotted.text, dotted.text
        missing = httpx.get(f"{api_url}/v1/jobs/{job_id}/artifacts/nope", headers=ALICE)
        assert missing.status_code == 404


def run_in_background_as(settings: Settings, job_id: uuid.UUID) -> Any:
    """``run_in_background`` for a job of tenant alice (it waits on the trainer's pid file)."""
    pid = settings.checkpoint_root / str(job_id) / "output" / "pid"
    outcome: list[Outcome] = []
    runner = threading.Thread(
        target=lambda: outcome.append(Supervisor(settings, IDENTITY).run(job_id))
    )
    runner.start()
    wait_for(pid.exists, "the trainer never started")
    return runner, outcome


def test_a_checkpoint_whose_download_does_not_match_is_skipped_for_the_one_before(
    s3_settings: Settings,  # noqa: F811
    tmp_path: Path,
) -> None:
    host_a, host_b = host(s3_settings, tmp_path, "a"), host(s3_settings, tmp_path, "b")
    # Given a built-in trainer's job that checkpointed at steps 2, 4 and 6 on host A, then
    # failed transiently
    job_id = submit(host_a, spec(faults={"fail_at_step": 7, "fail_with": "transient"}))
    baseline_id = submit(host_b, spec())
    assert Supervisor(host_a, IDENTITY).run(job_id) == Outcome.REQUEUED
    rows = recorded(host_a, job_id)
    assert [r.step for r in rows][-1] == 6 and all(r.storage_key for r in rows)
    # When the newest checkpoint's object is corrupted in the bucket
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint")
    open_store(host_a).put_file(rows[-1].storage_key, junk)
    shutil.rmtree(tmp_path / "a")
    # Then host B skips it, resumes from step 4 and ends with the uninterrupted weights
    make_due(host_b, job_id)
    assert Supervisor(host_b, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(host_b, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    kinds = [(k, m) for k, _, m in events(host_b, job_id)]
    skipped = [m for k, m in kinds if k == "checkpoint_skipped"]
    assert len(skipped) == 1 and "sha256 mismatch" in skipped[0], skipped
    assert any(k == "resumed" and "step 4" in m for k, m in kinds), kinds
    done, base = view(host_b, job_id, "t"), view(host_b, baseline_id, "t")
    assert done["result"]["weights_sha256"] == base["result"]["weights_sha256"]
    # and the built-in's final model is its artifact
    with session_scope(host_b.database_url) as s:
        names = s.scalars(text("SELECT name FROM artifacts WHERE job_id = :j"), {"j": job_id})
        assert list(names) == [Path(done["result"]["model_path"]).name]


def test_a_fenced_workers_upload_is_never_recorded(
    s3_settings: Settings,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Given a job leased twice: the first worker is fenced out by the second lease's epoch
    settings = host(s3_settings, tmp_path, "a")
    job_id = submit(settings, spec())
    with session_scope(settings.database_url) as s:
        grant = leases.acquire_lease(
            session=s, job_id=job_id, worker="w1", device_uuid=None, ttl=60
        )
        assert grant is not None
        s.execute(text("UPDATE jobs SET epoch = epoch + 1 WHERE id = :j"), {"j": job_id})
    stale = LeaseWriter(settings.database_url, job_id, grant.epoch, ttl=60)
    sync = CheckpointSync(stale, open_store(settings), keep=3)
    ckpt = tmp_path / "e1-s2.pt"
    ckpt.write_bytes(b"weights")
    # When the fenced worker syncs a checkpoint
    sync.submit(2, str(ckpt))
    sync.wait(30)
    # Then it learns that the lease is gone, nothing is recorded, and the object is gone
    try:
        sync.check()
        raise AssertionError("the fenced record was not refused")
    except LeaseLost:
        pass
    finally:
        sync.close()
    assert recorded(settings, job_id) == []
    assert f"fleet/{checkpoint_key(job_id, ckpt)}" not in bucket_keys(s3_endpoint)


def test_a_tensorflow_checkpoint_directory_resumes_on_another_host_from_the_store(
    s3_settings: Settings,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    host_a, host_b = host(s3_settings, tmp_path, "a"), host(s3_settings, tmp_path, "b")
    tf_spec = {"framework": "tensorflow"}
    # Given a TensorFlow job (checkpoints are directories) that checkpointed at steps 2 and 4 on
    # host A, then failed transiently, and host A's disk gone
    job_id = submit(host_a, spec(**tf_spec, faults={"fail_at_step": 5, "fail_with": "transient"}))
    baseline_id = submit(host_b, spec(**tf_spec))
    assert Supervisor(host_a, IDENTITY).run(job_id) == Outcome.REQUEUED
    rows = recorded(host_a, job_id)
    assert [r.step for r in rows] == [2, 4], rows
    assert all(r.sha256 and r.storage_key.endswith(".dir.tar") for r in rows), rows
    assert {f"fleet/{r.storage_key}" for r in rows} <= bucket_keys(s3_endpoint)
    shutil.rmtree(tmp_path / "a")
    # When host B takes it: it downloads the step-4 directory and resumes there
    make_due(host_b, job_id)
    assert Supervisor(host_b, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(host_b, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    kinds = [(k, m) for k, _, m in events(host_b, job_id)]
    assert not [m for k, m in kinds if k == "checkpoint_skipped"], kinds
    assert any(k == "resumed" and "step 4" in m for k, m in kinds), kinds
    # Then it ends with the weights of the uninterrupted run, and stale directories and their
    # objects are gone (the supervisor keeps the last N)
    done, base = view(host_b, job_id, "t"), view(host_b, baseline_id, "t")
    assert done["result"]["weights_sha256"] == base["result"]["weights_sha256"]
    kept = {f"fleet/{r.storage_key}" for r in recorded(host_b, job_id)}
    stored = {k for k in bucket_keys(s3_endpoint) if k.startswith(f"fleet/checkpoints/{job_id}/")}
    assert stored == kept, (stored, kept)
