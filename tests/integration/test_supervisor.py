"""The supervisor around real trainer processes, on a real Postgres (no Celery in between):
OOM backoff, failure classes, retries and cancellation."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.db.jobs import cancel_job, job_view, submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from workers.identity import WorkerIdentity
from workers.supervisor import Outcome, Supervisor

IDENTITY = WorkerIdentity(worker="test-worker@testhost", device_uuid=None, cuda=False)


@pytest.fixture
def fi_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"fault_injection": True})


def spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "framework": "torch",
        "model": {"input_dim": 8, "hidden_units": [16], "output_dim": 1},
        "data": {"samples": 1024, "seed": 0},
        "training": {
            "epochs": 2,
            "batch_size": 256,
            "learning_rate": 0.01,
            "seed": 0,
            "checkpoint_every_steps": 2,
        },
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def submit(settings: Settings, job: JobSpec) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=job).job_id


def view(settings: Settings, job_id: uuid.UUID) -> dict[str, Any]:
    with session_scope(settings.database_url) as s:
        return job_view(session=s, tenant="t", job_id=job_id)


def events(settings: Settings, job_id: uuid.UUID) -> list[tuple[str, int | None, str]]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            text("SELECT kind, epoch, message FROM job_events WHERE job_id = :j ORDER BY id"),
            {"j": job_id},
        ).all()
    return [(r.kind, r.epoch, r.message) for r in rows]


def run_in_background(
    settings: Settings, job_id: uuid.UUID, *, until_step: int, identity: WorkerIdentity = IDENTITY
) -> tuple[threading.Thread, list[Outcome]]:
    """Start the supervisor on a thread; return once the job has reached ``until_step``."""
    outcome: list[Outcome] = []
    runner = threading.Thread(
        target=lambda: outcome.append(Supervisor(settings, identity).run(job_id))
    )
    runner.start()
    deadline = time.monotonic() + 60
    while (view(settings, job_id)["progress"] or {}).get("step", 0) < until_step:
        assert time.monotonic() < deadline, "the job never made progress"
        time.sleep(0.05)
    return runner, outcome


def claim_device(settings: Settings, identity: WorkerIdentity) -> Any:
    """Register a simulated T4 and claim it for ``identity``, for long (no keeper runs here)."""
    from app.db import devices as device_rows
    from tests.conftest import device_record

    assert identity.device_uuid is not None
    record = device_record(identity.device_uuid, gpu_type="T4", gib=16)
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=[record])
        assert device_rows.claim_device(
            session=s, uuids=[record.uuid], worker=identity.worker, ttl=600
        )
    return record


def make_due(settings: Settings, job_id: uuid.UUID) -> None:
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE jobs SET retry_at = now() WHERE id = :j"), {"j": job_id})


def test_a_job_runs_to_its_result_with_progress_checkpoints_and_logs(
    fi_settings: Settings,
) -> None:
    job_id = submit(fi_settings, spec())
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    job = view(fi_settings, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 8
    assert job["checkpoint"]["step"] == 8
    assert len(job["result"]["weights_sha256"]) == 64
    with session_scope(fi_settings.database_url) as s:
        kept = s.scalar(text("SELECT count(*) FROM checkpoints WHERE job_id = :j"), {"j": job_id})
    assert kept == fi_settings.checkpoints_keep
    # A duplicate delivery after the end is acknowledged and does nothing
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SKIPPED


def test_oom_backoff_keeps_the_effective_batch_and_later_attempts_start_there(
    fi_settings: Settings,
) -> None:
    # Given a batch of 256 whose injected OOM fires above micro-batch 64, and a transient
    # failure later in the first attempt
    faults = {"oom_above_micro_batch": 64, "fail_at_step": 6, "fail_with": "transient"}
    job_id = submit(fi_settings, spec(faults=faults))
    baseline_id = submit(fi_settings, spec())
    # When it runs
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.REQUEUED
    backoffs = [e for e in events(fi_settings, job_id) if e[0] == "oom_backoff"]
    assert [m for _, _, m in backoffs] == [
        "out of memory at micro-batch 256: retrying with 128 x 2",
        "out of memory at micro-batch 128: retrying with 64 x 4",
    ]
    make_due(fi_settings, job_id)
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(fi_settings, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    # Then the second attempt started at 64 (no new backoff) and it ends with 64 x 4
    job = view(fi_settings, job_id)
    assert job["attempts"] == 2
    assert [e for e in events(fi_settings, job_id) if e[0] == "oom_backoff"] == backoffs
    assert job["batch"] == {"size": 256, "micro_batch": 64, "accumulation": 4}
    # And trains the same model as the run that never ran out of memory: the gradient is the
    # same sum, only added in another order (float rounding, ~1e-7 relative per step).
    baseline = view(fi_settings, baseline_id)["result"]["final_loss"]
    assert job["result"]["final_loss"] == pytest.approx(baseline, rel=1e-4)


def test_oom_at_every_micro_batch_fails_after_log2_batch_plus_one_tries(
    fi_settings: Settings,
) -> None:
    training = {"epochs": 2, "batch_size": 16, "learning_rate": 0.01, "seed": 0}
    faults = {"oom_above_micro_batch": 0}
    job_id = submit(fi_settings, spec(training=training, faults=faults, max_attempts=3))
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.FAILED
    job = view(fi_settings, job_id)
    assert job["error"]["kind"] == "oom" and job["attempts"] == 1
    backoffs = [e for e in events(fi_settings, job_id) if e[0] == "oom_backoff"]
    assert len(backoffs) + 1 == 5  # 16, 8, 4, 2, 1: log2(16) + 1 trainer runs


def test_a_bug_in_training_fails_at_once_as_a_user_error(fi_settings: Settings) -> None:
    faults = {"fail_at_step": 3, "fail_with": "value_error"}
    job_id = submit(fi_settings, spec(faults=faults, max_attempts=3))
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.FAILED
    job = view(fi_settings, job_id)
    assert job["error"]["kind"] == "user_error" and job["attempts"] == 1
    assert "ValueError" in job["error"]["message"]


def test_a_transient_error_retries_with_backoff_then_succeeds(fi_settings: Settings) -> None:
    faults = {"fail_at_step": 3, "fail_with": "transient"}
    job_id = submit(fi_settings, spec(faults=faults))
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.REQUEUED
    job = view(fi_settings, job_id)
    assert job["status"] == "queued" and job["retry_at"] is not None
    assert job["error"]["kind"] == "infra"
    # Not before its backoff
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SKIPPED
    make_due(fi_settings, job_id)
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    job = view(fi_settings, job_id)
    assert job["attempts"] == 2 and job["error"] is None
    assert [k for k, _, _ in events(fi_settings, job_id)].count("retry") == 1


def test_cancelling_a_running_job_stops_it_and_keeps_its_checkpoint(
    fi_settings: Settings,
) -> None:
    job_id = submit(
        fi_settings,
        spec(
            faults={"step_delay_s": 0.2},
            training={"epochs": 20, "batch_size": 256, "checkpoint_every_steps": 2},
        ),
    )

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (view(fi_settings, job_id)["progress"] or {}).get("step", 0) >= 3:
                with session_scope(fi_settings.database_url) as s:
                    cancel_job(session=s, tenant="t", job_id=job_id)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.CANCELLED
    canceller.join()
    job = view(fi_settings, job_id)
    assert job["status"] == "cancelled" and job["error"]["kind"] == "cancelled"
    assert job["checkpoint"] is not None
    assert job["progress"]["step"] < job["progress"]["total_steps"]


def test_a_corrupt_latest_checkpoint_is_skipped_for_the_one_before(
    fi_settings: Settings,
) -> None:
    # Given an attempt that checkpointed at steps 2, 4 and 6 and then failed transiently
    faults = {"fail_at_step": 7, "fail_with": "transient"}
    job_id = submit(fi_settings, spec(faults=faults))
    baseline_id = submit(fi_settings, spec())
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.REQUEUED
    newest = view(fi_settings, job_id)["checkpoint"]
    assert newest["step"] == 6
    # When the newest checkpoint is truncated on disk
    with open(newest["path"], "r+b") as f:
        f.truncate(100)
    make_due(fi_settings, job_id)
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(fi_settings, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    # Then the job resumed from step 4, said so, and ended with the uninterrupted weights
    kinds = [(k, m) for k, _, m in events(fi_settings, job_id)]
    skipped = [m for k, m in kinds if k == "checkpoint_skipped"]
    assert len(skipped) == 1 and newest["path"] in skipped[0]
    assert any(k == "resumed" and "step 4" in m for k, m in kinds)
    assert (
        view(fi_settings, job_id)["result"]["weights_sha256"]
        == view(fi_settings, baseline_id)["result"]["weights_sha256"]
    )


@pytest.mark.parametrize("outage", ["cut", "freeze"])
def test_a_supervisor_that_cannot_renew_kills_its_trainer_before_the_lease_expires(
    fi_settings: Settings, outage: str
) -> None:
    from tests.conftest import app_address, with_port
    from tests.e2e.fleet import cmdline, descendants
    from tests.outage import CuttableProxy

    # Given a job running through a database connection that is about to fail
    proxy = CuttableProxy(app_address())
    through_proxy = fi_settings.model_copy(
        update={"database_url": with_port(fi_settings.database_url, proxy.port)}
    )
    job_id = submit(fi_settings, spec(faults={"step_delay_s": 0.2}, training={"epochs": 50}))
    runner, outcome = run_in_background(through_proxy, job_id, until_step=2)
    trainers = [p for p in descendants(os.getpid()) if "workers.trainers.main" in cmdline(p)]
    assert len(trainers) == 1
    # When the database goes away: refused connections, or a black hole that never answers
    failed_at = time.monotonic()
    proxy.cut() if outage == "cut" else proxy.freeze()
    # Then the trainer is killed before the lease can expire, whatever the supervisor waits on
    while Path(f"/proc/{trainers[0]}").exists() and "trainers" in cmdline(trainers[0]):
        assert time.monotonic() - failed_at < fi_settings.lease_ttl, "trainer outlived its lease"
        time.sleep(0.05)
    # And once the database answers again, the job is handed back without spending an attempt:
    # an outage is not the job's fault
    proxy.thaw() if outage == "freeze" else proxy.restore()
    runner.join(timeout=60)
    assert outcome == [Outcome.REQUEUED]
    job = view(fi_settings, job_id)
    assert job["status"] == "queued" and job["attempts"] == 0
    handed_back = [m for k, _, m in events(fi_settings, job_id) if k == "handed_back"]
    assert len(handed_back) == 1 and "could not reach the database" in handed_back[0]


def test_a_worker_that_loses_its_gpu_stops_the_trainer_and_hands_the_job_back(
    fi_settings: Settings,
) -> None:
    from tests.e2e.fleet import cmdline, descendants

    # Given a job running on a device its worker has claimed (for long: no keeper runs here)
    identity = WorkerIdentity(worker=IDENTITY.worker, device_uuid="GPU-sim-0", cuda=False)
    record = claim_device(fi_settings, identity)
    job_id = submit(fi_settings, spec(faults={"step_delay_s": 0.2}, training={"epochs": 50}))
    runner, outcome = run_in_background(fi_settings, job_id, until_step=2, identity=identity)
    trainers = [p for p in descendants(os.getpid()) if "workers.trainers.main" in cmdline(p)]
    assert len(trainers) == 1
    # When another worker takes the GPU (the claim expired: a stuck or crashed device keeper)
    with session_scope(fi_settings.database_url) as s:
        s.execute(
            text("UPDATE devices SET worker = 'thief@otherhost' WHERE uuid = :u"),
            {"u": record.uuid},
        )
    stolen_at = time.monotonic()
    # Then the trainer is gone within a few heartbeats, and the job is due again at once
    runner.join(timeout=60)
    assert outcome == [Outcome.REQUEUED]
    assert time.monotonic() - stolen_at < 3 * fi_settings.heartbeat_interval + 2
    assert not (Path(f"/proc/{trainers[0]}").exists() and "trainers" in cmdline(trainers[0]))
    job = view(fi_settings, job_id)
    assert job["status"] == "queued" and job["error"]["kind"] == "infra"
    assert "lost its claim on device GPU-sim-0" in job["error"]["message"]
    with session_scope(fi_settings.database_url) as s:
        due = s.scalar(text("SELECT retry_at <= now() FROM jobs WHERE id = :j"), {"j": job_id})
        lease = s.scalar(text("SELECT outcome FROM leases WHERE job_id = :j"), {"j": job_id})
    assert due and lease == "requeued"


def test_a_draining_worker_hands_its_job_back_at_a_checkpoint_without_spending_an_attempt(
    fi_settings: Settings, tmp_path: Path
) -> None:
    from app.queue import Dispatcher

    flag = tmp_path / "drain"
    draining = dataclasses.replace(IDENTITY, drain_file=flag)
    training = {"epochs": 8, "batch_size": 256, "checkpoint_every_steps": 5}
    job_id = submit(fi_settings, spec(faults={"step_delay_s": 0.1}, training=training))
    baseline_id = submit(fi_settings, spec(training=training))
    runner, outcome = run_in_background(fi_settings, job_id, until_step=7, identity=draining)
    # When its worker starts shutting down (between two checkpoints)
    flag.touch()
    runner.join(timeout=60)
    # Then the trainer stopped with a checkpoint at its last step, and the job is due again at
    # once with no attempt spent
    assert outcome == [Outcome.REQUEUED]
    job = view(fi_settings, job_id)
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["checkpoint"]["step"] == job["progress"]["step"] > 5
    assert [lease["outcome"] for lease in job["leases"]] == ["requeued"]
    assert [k for k, _, _ in events(fi_settings, job_id)].count("handed_back") == 1
    # (its wake-up is already in the broker: no waiting for the reaper's next pass)
    assert Dispatcher(fi_settings).pending(job["queue"]) == 1
    # And another worker resumes it from there to the weights of an uninterrupted run
    flag.unlink()
    assert Supervisor(fi_settings, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    assert Supervisor(fi_settings, IDENTITY).run(baseline_id) == Outcome.SUCCEEDED
    resumed, baseline = view(fi_settings, job_id), view(fi_settings, baseline_id)
    assert resumed["attempts"] == 1
    assert any(
        k == "resumed" and f"step {job['checkpoint']['step']} " in m
        for k, _, m in events(fi_settings, job_id)
    )
    assert resumed["result"]["weights_sha256"] == baseline["result"]["weights_sha256"]


def _log_text(settings: Settings, job_id: uuid.UUID) -> str:
    with session_scope(settings.database_url) as s:
        chunks = s.scalars(
            text("SELECT chunk FROM job_logs WHERE job_id = :j ORDER BY id"), {"j": job_id}
        ).all()
    return "".join(chunks)


def _probe(settings: Settings, entrypoint: str) -> tuple[Settings, uuid.UUID]:
    allowed = settings.model_copy(update={"entrypoint_allow": "tests.custom_trainers"})
    job = spec(entrypoint=f"tests.custom_trainers.probes:{entrypoint}")
    return allowed, submit(allowed, job)


def test_the_trainer_never_sees_the_worker_s_secrets(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose environment holds the database and broker URLs, API tokens and
    # storage credentials (as a real worker's does)
    secrets = {
        "GPUFLEET_DATABASE_URL": settings.database_url,
        "GPUFLEET_BROKER_URL": settings.broker_url,
        "GPUFLEET_API_TOKENS": "t:secret-token",
        "AWS_SECRET_ACCESS_KEY": "secret-key",
        "DATABASE_URL": settings.database_url,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    allowed, job_id = _probe(settings, "dump_environment")
    # When a job's own code dumps its environment
    assert Supervisor(allowed, IDENTITY).run(job_id) == Outcome.SUCCEEDED
    line = next(x for x in _log_text(allowed, job_id).splitlines() if x.startswith("ENVIRONMENT"))
    names = set(json.loads(line.removeprefix("ENVIRONMENT ")))
    # Then it finds none of them, but what a training process needs
    assert not names & set(secrets)
    assert {"PATH", "OMP_NUM_THREADS", "GPUFLEET_CONTROL_FD"} <= names
    assert {n for n in names if n.startswith("GPUFLEET_")} <= {
        "GPUFLEET_CONTROL_FD",
        "GPUFLEET_SUPERVISOR_PID",
    }


def test_stopping_a_trainer_stops_everything_it_spawned(settings: Settings) -> None:
    # Given a trainer that started a long-lived child of its own
    allowed, job_id = _probe(settings, "spawn_and_wait")
    runner, outcome = run_in_background(allowed, job_id, until_step=2)
    deadline = time.monotonic() + 10
    while not (lines := [x for x in _log_text(allowed, job_id).splitlines() if "CHILD" in x]):
        assert time.monotonic() < deadline, "the trainer's output never reached its log"
        time.sleep(0.1)
    child = int(lines[0].split()[1])
    assert Path(f"/proc/{child}").exists()
    # When the job is cancelled
    with session_scope(allowed.database_url) as s:
        cancel_job(session=s, tenant="t", job_id=job_id)
    runner.join(timeout=60)
    # Then the trainer and its child are both gone
    assert outcome == [Outcome.CANCELLED]
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the trainer's child outlived the job"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("first", ["drain", "device"])
def test_a_drain_and_a_lost_device_together_end_as_a_lost_device_whichever_comes_first(
    fi_settings: Settings, tmp_path: Path, first: str
) -> None:

    # Given a job between two slow steps on a claimed device, on a worker with a drain flag
    flag = tmp_path / "drain"
    identity = WorkerIdentity(
        worker=IDENTITY.worker, device_uuid="GPU-sim-0", cuda=False, drain_file=flag
    )
    claim_device(fi_settings, identity)
    job_id = submit(fi_settings, spec(faults={"step_delay_s": 1.5}, training={"epochs": 50}))
    runner, outcome = run_in_background(fi_settings, job_id, until_step=1, identity=identity)

    def steal() -> None:
        with session_scope(fi_settings.database_url) as s:
            s.execute(text("UPDATE devices SET worker = 'thief@otherhost'"))

    # When the worker is told to stop and loses its GPU, in either order, the second arriving
    # after the supervisor has acted on the first (the trainer is still between two steps)
    for event in ["drain", "device"] if first == "drain" else ["device", "drain"]:
        flag.touch() if event == "drain" else steal()
        time.sleep(2 * fi_settings.heartbeat_interval)
    runner.join(timeout=60)
    # Then the lost device decides (documented precedence): an infrastructure try, counted
    assert outcome == [Outcome.REQUEUED]
    job = view(fi_settings, job_id)
    assert job["attempts"] == 1 and "lost its claim" in job["error"]["message"]
    assert [k for k, _, _ in events(fi_settings, job_id)].count("handed_back") == 0


def test_a_cancel_reaches_the_running_trainer_within_a_second(
    fi_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    from app.queue import cancel_channel

    # Given a running job whose supervisor heartbeats only every 5 s
    slow_beat = fi_settings.model_copy(update={"heartbeat_interval": 5.0, "lease_ttl": 30.0})
    job_id = submit(slow_beat, spec(faults={"step_delay_s": 0.1}, training={"epochs": 50}))
    runner, outcome = run_in_background(slow_beat, job_id, until_step=2)
    time.sleep(0.5)  # (past the supervisor's first ticks)
    # When a user cancels it (the API commits, then announces it on Redis)
    with session_scope(slow_beat.database_url) as s:
        cancel_job(session=s, tenant="t", job_id=job_id)
    cancelled_at = time.time()
    redis.Redis.from_url(slow_beat.broker_url).publish(cancel_channel(job_id), "cancel")
    # Then the trainer is asked to stop within a second, long before the next heartbeat
    with caplog.at_level("WARNING", logger="workers.watch"):
        runner.join(timeout=30)
    asked = [r.created for r in caplog.records if "stopping the trainer: cancelled" in r.message]
    assert outcome == [Outcome.CANCELLED]
    assert asked and asked[0] - cancelled_at <= 1.0, asked


def test_a_job_past_its_max_runtime_stops_at_a_checkpoint_and_fails_timeout(
    fi_settings: Settings,
) -> None:
    # Given a long job allowed 12 s per attempt (a trainer takes seconds to start when loaded)
    job = spec(faults={"step_delay_s": 0.1}, training={"epochs": 50}, max_runtime=12.0)
    job_id = submit(fi_settings, job)
    # When it runs past that
    runner, outcome = run_in_background(fi_settings, job_id, until_step=1)
    runner.join(timeout=60)
    # Then it stopped at a checkpoint of its last step and failed `timeout`
    assert outcome == [Outcome.FAILED]
    result = view(fi_settings, job_id)
    assert result["error"]["kind"] == "timeout"
    assert "max_runtime (12s)" in result["error"]["message"]
    assert result["checkpoint"]["step"] == result["progress"]["step"] > 1


def test_a_warm_spare_runs_the_next_job_and_a_fresh_one_replaces_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.warm_spare import WarmSpare

    # Given a supervisor with a spare trainer that has imported torch ahead of the job
    spare = WarmSpare()
    spare.start("torch")
    assert spare.trainer is not None
    first_spare = spare.trainer.pid
    allowed, job_id = _probe(settings, "report_pid")
    supervisor = Supervisor(allowed, IDENTITY, spare=spare)
    # When a job runs
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    # Then the spare ran it, torch already imported, and a new spare waits for the next job
    assert f"PID {first_spare} TORCH_PRELOADED True" in _log_text(allowed, job_id)
    assert spare.trainer is not None and spare.trainer.poll() is None
    assert spare.trainer.pid != first_spare
    # And a spare gone stale (the worker's environment changed) is not used, but replaced
    second_spare = spare.trainer.pid
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _, other_id = _probe(settings, "report_pid")
    assert supervisor.run(other_id) == Outcome.SUCCEEDED
    assert f"PID {second_spare} " not in _log_text(allowed, other_id)
    assert spare.trainer is not None and spare.trainer.pid not in (first_spare, second_spare)
    spare.discard()


def test_a_gpu_fault_marks_the_device_suspect_and_sends_the_job_elsewhere_at_once(
    fi_settings: Settings,
) -> None:
    from app.db import devices as device_rows

    # Given a job on a claimed device, whose third step hits an uncorrectable ECC error
    identity = WorkerIdentity(worker=IDENTITY.worker, device_uuid="GPU-sim-0", cuda=False)
    record = claim_device(fi_settings, identity)
    job_id = submit(fi_settings, spec(faults={"fail_at_step": 3, "fail_with": "gpu_fault"}))
    # When it runs
    assert Supervisor(fi_settings, identity).run(job_id) == Outcome.REQUEUED
    # Then the try counts as the infrastructure's, the job is due again at once for another
    # GPU, and this one takes no job until its health check passes
    job = view(fi_settings, job_id)
    assert job["status"] == "queued" and job["attempts"] == 1
    assert job["error"]["kind"] == "infra" and "ECC" in job["error"]["message"]
    with session_scope(fi_settings.database_url) as s:
        due = s.scalar(text("SELECT retry_at <= now() FROM jobs WHERE id = :j"), {"j": job_id})
        suspicion = device_rows.suspicion(session=s, uuid=record.uuid)
    assert due and suspicion is not None
    assert Supervisor(fi_settings, identity).run(job_id) == Outcome.SKIPPED
