"""The supervisor leading a gang (``gpu_count`` 2) on a real Postgres, with real trainer ranks
(gloo on the CPU), no Celery in between: OOM backoff halves every rank's micro-batch
together, one failed rank ends the attempt with its class, and a member's lost worker fences
the gang."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import text

from app.db import devices as device_rows
from app.db.session import session_scope
from app.settings import Settings
from tests.conftest import device_record
from tests.integration.test_supervisor import (
    events,
    make_due,
    run_in_background,
    spec,
    submit,
    view,
)
from workers import gang
from workers.gang_lease import sit_out
from workers.identity import WorkerIdentity
from workers.supervisor import Outcome, Supervisor

HOST = "gang-host"
DEVICES = ["GPU-g0", "GPU-g1"]
LEADER = WorkerIdentity(worker="A100-0@gang-host", device_uuid="GPU-g0", cuda=False)
MEMBER = WorkerIdentity(worker="A100-1@gang-host", device_uuid="GPU-g1", cuda=False)


@pytest.fixture
def host(settings: Settings) -> Settings:
    """A host of 2 simulated A100s, each claimed by its own worker (for long: no keeper)."""
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(
            session=s,
            devices=[
                dataclasses.replace(device_record(u, index=i), host=HOST)
                for i, u in enumerate(DEVICES)
            ],
        )
        for who in (LEADER, MEMBER):
            assert who.device_uuid is not None
            assert device_rows.claim_device(
                session=s, uuids=[who.device_uuid], worker=who.worker, ttl=600
            )
    return settings.model_copy(
        update={
            "hostname": HOST,
            "fault_injection": True,
            "entrypoint_allow": "tests.custom_trainers",
        }
    )


def _gang_rows(settings: Settings) -> dict[str, Any]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(text("SELECT uuid, gang_job, current_job FROM devices")).all()
    return {r.uuid: (r.gang_job, r.current_job) for r in rows}


def _log(settings: Settings, job_id: Any) -> str:
    with session_scope(settings.database_url) as s:
        return "".join(
            s.scalars(
                text("SELECT chunk FROM job_logs WHERE job_id = :j ORDER BY id"), {"j": job_id}
            ).all()
        )


def _why(settings: Settings, job_id: Any) -> str:
    """What a run that ended otherwise than expected left: the job's error, events and log."""
    return (
        f"{view(settings, job_id)['error']}\n{events(settings, job_id)}\n{_log(settings, job_id)}"
    )


def test_oom_halves_every_ranks_micro_batch_together(host: Settings) -> None:
    # Given a gang job that runs out of memory above a micro-batch of 128 (batch 256)
    job_id = submit(host, spec(resources={"gpu_count": 2}, faults={"oom_above_micro_batch": 128}))
    # When the leader runs it
    assert Supervisor(host, LEADER).run(job_id) == Outcome.SUCCEEDED
    # Then it halved within its one lease, and both ranks then trained at 128
    job = view(host, job_id)
    assert job["attempts"] == 1 and job["batch"]["micro_batch"] == 128
    assert [m for k, _, m in events(host, job_id) if k == "oom_backoff"] != []
    log = _log(host, job_id)
    for rank in (0, 1):
        assert f"[rank {rank}] " in log
    assert "= 2 x micro-batch 128" in log and "rank 1 of 2" in log
    # And the gang's devices are free again
    assert _gang_rows(host) == {d: (None, None) for d in DEVICES}


def test_one_failed_rank_stops_the_gang_and_names_the_attempts_end(host: Settings) -> None:
    job_id = submit(
        host,
        spec(
            framework=None,
            entrypoint="tests.custom_trainers.ranks:fail_on_rank_1",
            resources={"gpu_count": 2},
        ),
    )
    started = time.monotonic()
    assert Supervisor(host, LEADER).run(job_id) == Outcome.FAILED
    # Rank 0 (which would have run 5 minutes) was stopped at once, and the job failed with
    # rank 1's class and message
    assert time.monotonic() - started < 60
    job = view(host, job_id)
    assert job["error"]["kind"] == "user_error"
    assert "rank 1 found a bad row" in job["error"]["message"]
    assert _gang_rows(host) == {d: (None, None) for d in DEVICES}


def test_a_members_lost_worker_fences_the_gang(host: Settings) -> None:
    # Given a gang job running (slowly) on both devices
    job_id = submit(host, spec(resources={"gpu_count": 2}, faults={"step_delay_s": 0.2}))
    runner, outcome = run_in_background(host, job_id, until_step=1, identity=LEADER)
    assert _gang_rows(host)["GPU-g1"][0] == job_id
    # And the member's worker, woken for another job meanwhile, sits out
    other = submit(host, spec())
    sat: list[bool] = []
    sitter = threading.Thread(target=lambda: sat.append(sit_out(host, MEMBER, other)))
    sitter.start()
    # When the member's worker goes silent (its device claim expires)
    with session_scope(host.database_url) as s:
        s.execute(
            text("UPDATE devices SET expires_at = now() - interval '1 second' WHERE uuid = :u"),
            {"u": "GPU-g1"},
        )
    # Then the leader stops the whole gang and hands the job back
    runner.join(timeout=60)
    assert outcome == [Outcome.REQUEUED]
    job = view(host, job_id)
    assert job["status"] == "queued" and "lost its claim" in job["error"]["message"]
    # And the gang let its devices go, which ends the member's sitting out
    sitter.join(timeout=10)
    assert sat == [True]
    assert _gang_rows(host) == {d: (None, None) for d in DEVICES}


def test_a_gang_whose_rendezvous_port_was_taken_is_retried_not_failed(
    host: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the port chosen for a gang's rendezvous, taken by another process before rank 0
    # could bind it
    job_id = submit(host, spec(resources={"gpu_count": 2}))
    with socket.socket() as taken:
        taken.bind((gang.MASTER_ADDR, 0))
        taken.listen()
        monkeypatch.setattr(gang, "free_port", lambda: taken.getsockname()[1])
        # When the leader runs the gang
        outcome = Supervisor(host, LEADER).run(job_id)
    # Then the attempt ends as infrastructure's failure (retried), not as the user's
    assert outcome == Outcome.REQUEUED, _why(host, job_id)
    error = view(host, job_id)["error"]
    assert error["kind"] == "infra" and "EADDRINUSE" in error["message"], error
    # And the next attempt, on a free port, trains to the end
    monkeypatch.undo()
    make_due(host, job_id)
    assert Supervisor(host, LEADER).run(job_id) == Outcome.SUCCEEDED, _why(host, job_id)


def test_a_command_gang_trains_like_one_process_and_resumes_bit_for_bit(host: Settings) -> None:
    from tests.integration.test_command_jobs import COMMANDS, command_spec, weights

    host = host.model_copy(update={"command_jobs": True})
    script = str(COMMANDS / "ddp_train.py")
    # Given the same data-parallel SDK script as a job of one GPU, of two, and of two that
    # fails (transiently) at step 7, after its checkpoint at step 4
    one = submit(host, command_spec(script))
    two = submit(host, command_spec(script, resources={"gpu_count": 2}))
    broken = command_spec(
        script,
        resources={"gpu_count": 2},
        faults={"fail_at_step": 7, "fail_with": "transient"},
    )
    interrupted = submit(host, broken)
    # When the leader runs them (the broken one twice: it is retried)
    for job_id, outcome in (
        (one, Outcome.SUCCEEDED),
        (two, Outcome.SUCCEEDED),
        (interrupted, Outcome.REQUEUED),
    ):
        assert Supervisor(host, LEADER).run(job_id) == outcome, _why(host, job_id)
    make_due(host, interrupted)
    outcome = Supervisor(host, LEADER).run(interrupted)
    assert outcome == Outcome.SUCCEEDED, _why(host, interrupted)
    # Then two ranks ran (each its shard) and trained what one process trains, within float
    # summation order; rank 0 alone recorded checkpoints (one row per step)
    log = _log(host, two)
    assert "[rank 0] rank 0 of 2" in log and "[rank 1] rank 1 of 2" in log, log
    w1, w2 = weights(host, one), weights(host, two)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-6), (name, w1[name], w2[name])
    with session_scope(host.database_url) as s:
        steps = s.scalars(
            text("SELECT step FROM checkpoints WHERE job_id = :j ORDER BY id"), {"j": two}
        ).all()
    assert steps == [4, 8, 12], steps
    # and the interrupted gang resumed from step 4 to the uninterrupted gang's weights exactly
    assert "[rank 1] rank 1 of 2 from step 4" in _log(host, interrupted)
    w3 = weights(host, interrupted)
    assert all(torch.equal(w2[name], w3[name]) for name in w2)
    assert _gang_rows(host) == {d: (None, None) for d in DEVICES}


@pytest.mark.tensorflow
def test_a_tensorflow_gang_is_one_process_of_two_replicas_and_resumes_bit_for_bit(
    host: Settings,
) -> None:
    # Given a TensorFlow job of 2 GPUs that runs out of memory above a micro-batch of 128
    # (batch 256), and the same job failing (transiently) at step 5, after its checkpoint at 4
    faults = {"oom_above_micro_batch": 128}
    tf_spec = dict(framework="tensorflow", resources={"gpu_count": 2})
    whole = submit(host, spec(**tf_spec, faults=faults))
    broken = {**faults, "fail_at_step": 5, "fail_with": "transient"}
    interrupted = submit(host, spec(**tf_spec, faults=broken))
    # When the leader runs them (the broken one twice: it is retried)
    assert Supervisor(host, LEADER).run(whole) == Outcome.SUCCEEDED
    assert Supervisor(host, LEADER).run(interrupted) == Outcome.REQUEUED
    make_due(host, interrupted)
    assert Supervisor(host, LEADER).run(interrupted) == Outcome.SUCCEEDED
    # Then one trainer process mirrored the model on 2 replicas (no ranks), halved its
    # micro-batch for both at once, and the retry resumed from step 4 to the same weights
    log = _log(host, whole)
    assert "2 replicas (MirroredStrategy over" in log and "[rank" not in log, log
    assert view(host, whole)["batch"]["micro_batch"] == 128
    assert "= 2 x micro-batch 128" in log
    assert "from step 4" in _log(host, interrupted)
    results = [view(host, j)["result"] for j in (whole, interrupted)]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert results[0]["final_loss"] == results[1]["final_loss"]
    assert _gang_rows(host) == {d: (None, None) for d in DEVICES}


WHO = b"""
import os


def train(ctx):
    print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} ran {__name__}", flush=True)
    return {"final_loss": None, "model_path": "", "weights_sha256": ""}
"""


def test_a_gangs_entrypoint_from_its_snapshot_runs_on_every_rank(
    host: Settings, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from tests.integration.api_support import ALICE, AUTH
    from tests.integration.test_snapshots_api import tar_gz, upload

    # Given a 2-GPU job whose entrypoint is in its own snapshot (a module on no allow-list)
    snap = host.model_copy(
        update={**AUTH, "command_jobs": True, "storage_root": tmp_path / "store"}
    )
    client = TestClient(create_app(snap))
    status, body = upload(
        client, tar_gz(("mygang/__init__.py", b""), ("mygang/who.py", WHO)), ALICE
    )
    assert status == 201, body
    job = {
        "entrypoint": "mygang.who:train",
        "snapshot": body["id"],
        "resources": {"gpu_count": 2},
    }
    created = client.post("/v1/jobs", json=job, headers=ALICE)
    assert created.status_code == 201, created.text
    job_id = uuid.UUID(created.json()["id"])
    # When the leader runs it, then every rank imported the snapshot's code
    assert Supervisor(snap, LEADER).run(job_id) == Outcome.SUCCEEDED
    log = _log(snap, job_id)
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} of 2 ran mygang.who" in log, log
