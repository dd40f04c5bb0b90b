"""The job queue end to end: API, reaper and Celery workers as processes, real CPU training."""

from __future__ import annotations

import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from app.db.session import session_scope
from app.embedded import EmbeddedRedis
from app.queue import Dispatcher
from app.settings import Settings
from tests.e2e.fleet import Fleet, cmdline, small_job, wait_for

pytestmark = pytest.mark.e2e

#: lease_ttl + reaper_interval of the e2e timings, plus time for a fresh trainer to start.
RECOVERY_S = 3 + 0.5 + 15


def _device_types(fleet: Fleet) -> dict[str, str]:
    return {d["uuid"]: d["type"] for d in fleet.get("/v1/devices")["devices"]}


def test_mixed_jobs_all_succeed_on_devices_that_fit(fleet: Fleet) -> None:
    # Given an A100:80 worker and a T4:16 worker
    fleet.start_a100_and_t4()
    # When ten jobs of mixed requirements are submitted
    mixes = [
        {"gpu_type": "any", "memory_gb": 4},
        {"gpu_type": "any", "memory_gb": 40},
        {"gpu_type": "T4", "memory_gb": 16},
        {"gpu_type": "a100", "memory_gb": 80},
        {"gpu_type": "any", "memory_gb": 12},
    ] * 2
    big = {i for i, m in enumerate(mixes) if m["memory_gb"] > 16 or m["gpu_type"] == "a100"}
    ids = [fleet.submit(small_job(name=f"mix-{i}", resources=m)) for i, m in enumerate(mixes)]
    final = fleet.wait_final(ids, timeout=240)
    # Then every job succeeds, each on a device that fits it
    types = _device_types(fleet)
    for i, job_id in enumerate(ids):
        job = final[job_id]
        assert job["status"] == "succeeded", job
        device_type = types[job["leases"][-1]["device"]]
        if i in big:
            assert device_type == "A100", (mixes[i], device_type)
        if mixes[i]["gpu_type"] == "T4":
            assert device_type == "T4"
    # And a job shows its progress, attempts, lease history and result
    job = final[ids[1]]
    assert job["attempts"] == 1 and len(job["leases"]) == 1
    assert job["leases"][0]["outcome"] == "succeeded"
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 40
    assert job["result"]["final_loss"] is not None and job["result"]["weights_sha256"]


def _long_job(**overrides: object) -> dict[str, object]:
    # ~120 optimizer steps at 50 ms each: long enough to kill mid-run.
    return small_job(
        training={"epochs": 6, "checkpoint_every_steps": 10},
        faults={"step_delay_s": 0.05},
        **overrides,
    )


def test_killed_worker_job_finishes_elsewhere(fleet: Fleet) -> None:
    # Given two A100 workers and a long job running on one of them
    workers = fleet.start_two_a100s()
    job_id = fleet.submit(_long_job())
    holder = fleet.holder(job_id, workers)
    wait_for(lambda: (fleet.job(job_id)["progress"] or {}).get("step", 0) >= 15, timeout=60)
    first_worker = fleet.job(job_id)["lease"]["worker"]
    # When its whole process tree is killed with SIGKILL
    killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
    holder.signal_tree(signal.SIGKILL)
    # Then the reaper requeues it within lease_ttl + reaper_interval
    wait_for(
        lambda: fleet.job(job_id)["attempts"] == 2,
        timeout=RECOVERY_S,
        what="the job to be requeued and leased again",
    )
    assert time.monotonic() - killed_at < RECOVERY_S
    # And the other worker finishes it; the first lease is closed as expired
    job = fleet.wait_final([job_id], timeout=120)[job_id]
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2
    assert [lease["outcome"] for lease in job["leases"]] == ["expired", "succeeded"]
    assert job["leases"][1]["worker"] != first_worker
    # And the reaper closed the dead lease within lease_ttl + reaper_interval of the kill (the
    # database's clock; 1 s of slack for a reaper pass on a loaded machine)
    reaped_after = datetime.fromisoformat(job["leases"][0]["released_at"]) - killed_wall
    assert reaped_after.total_seconds() <= 3 + 0.5 + 1.0, reaped_after


def test_a_worker_told_to_stop_hands_its_job_back_and_exits(fleet: Fleet) -> None:
    # Given two A100 workers and a long job running on one of them
    workers = fleet.start_two_a100s()
    job_id = fleet.submit(_long_job())
    holder = fleet.holder(job_id, workers)
    wait_for(lambda: (fleet.job(job_id)["progress"] or {}).get("step", 0) >= 15, timeout=60)
    # When it is told to stop (`docker stop` sends SIGTERM to the worker's main process)
    stopped_at = time.monotonic()
    holder.popen.send_signal(signal.SIGTERM)
    # Then it checkpoints, hands the job back and exits in seconds, not at the job's end
    holder.popen.wait(timeout=60)
    assert time.monotonic() - stopped_at < 15, "the worker sat on its job"
    # And the other worker resumes the job and finishes it; no attempt was spent
    job = fleet.wait_final([job_id], timeout=120)[job_id]
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert [lease["outcome"] for lease in job["leases"]] == ["requeued", "succeeded"]
    assert job["leases"][0]["worker"] != job["leases"][1]["worker"]
    kinds = [e["kind"] for e in fleet.get(f"/v1/jobs/{job_id}/events")["events"]]
    assert "handed_back" in kinds and "resumed" in kinds


def test_redis_losing_everything_loses_no_job(
    fleet_env: dict[str, str], own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    # Given queued jobs whose wake-ups sit in a Redis of this test's own, while no worker runs
    fleet = Fleet(env={**fleet_env, "GPUFLEET_BROKER_URL": own_redis.url()}, workdir=tmp_path)
    try:
        fleet.start_api()
        fleet.start_reaper()
        ids = [fleet.submit(small_job(name=f"lost-{i}")) for i in range(4)]
        client = redis.Redis.from_url(own_redis.url())
        assert client.dbsize() > 0
        # When Redis dies and comes back empty (no persistence): every message and binding lost
        assert own_redis.proc is not None
        own_redis.proc.kill()
        own_redis.proc.wait()
        own_redis.start()
        assert client.dbsize() == 0
        # Then once workers start, every job still finishes (the reaper dispatches again)
        fleet.start_worker("worker-a", fake_gpus="A100:80", host="host-a")
        fleet.start_worker("worker-b", fake_gpus="T4:16", host="host-b")
        final = fleet.wait_final(ids, timeout=180)
        assert all(job["status"] == "succeeded" for job in final.values())
    finally:
        fleet.stop()


def test_duplicate_deliveries_run_once(fleet: Fleet, db_url: str, broker_url: str) -> None:
    # Given two workers and a job
    fleet.start_a100_and_t4()
    job_id = fleet.submit(small_job())
    # When its wake-up is delivered five more times
    dispatcher = Dispatcher(Settings(database_url=db_url, broker_url=broker_url))
    for _ in range(5):
        dispatcher.dispatch(job_id=uuid.UUID(job_id), queue="gpu.any.8", priority=5)
    job = fleet.wait_final([job_id], timeout=120)[job_id]
    time.sleep(3)  # let every duplicate reach a worker
    # Then exactly one lease, one run and one finish
    assert job["status"] == "succeeded"
    events = fleet.get(f"/v1/jobs/{job_id}/events")["events"]
    kinds = [e["kind"] for e in events]
    assert kinds.count("leased") == 1 and kinds.count("succeeded") == 1
    assert len(fleet.job(job_id)["leases"]) == 1
    worker_logs = "".join(p.log() for p in fleet.procs if p.name.startswith("worker"))
    assert worker_logs.count("not leased") >= 1


def test_worker_whose_lease_was_taken_stops_writing(fleet: Fleet, db_url: str) -> None:
    # Given two workers and a long job on one of them
    workers = fleet.start_two_a100s()
    job_id = fleet.submit(_long_job())
    holder = fleet.holder(job_id, workers)
    wait_for(lambda: (fleet.job(job_id)["progress"] or {}).get("step", 0) >= 10, timeout=60)
    frozen = holder
    # (a trainer started cold runs workers.trainers.main; one the warm spare became, .warm)
    trainers = [p for p in frozen.tree() if "workers.trainers." in cmdline(p)]
    assert trainers, "the holder runs a trainer process"
    # When it is frozen past its lease, and the job is taken over
    frozen.signal_tree(signal.SIGSTOP)
    wait_for(lambda: fleet.job(job_id)["attempts"] == 2, timeout=RECOVERY_S, what="takeover")
    first_epoch = fleet.job(job_id)["leases"][0]["epoch"]
    # And then it wakes up
    frozen.signal_tree(signal.SIGCONT)
    # Then its trainer is stopped, and nothing it writes for the old epoch lands
    wait_for(
        lambda: not any("workers.trainers." in cmdline(p) for p in trainers),
        timeout=15,
        what="the old trainer to be stopped",
    )
    job = fleet.wait_final([job_id], timeout=120)[job_id]
    assert job["status"] == "succeeded"
    settings_url = db_url
    with session_scope(settings_url) as s:
        late = s.scalar(
            text(
                "SELECT count(*) FROM job_events WHERE job_id = :j AND epoch = :e "
                "AND kind NOT IN ('leased', 'lease_expired') AND at > ("
                "  SELECT at FROM job_events WHERE job_id = :j AND kind = 'lease_expired')"
            ),
            {"j": job_id, "e": first_epoch},
        )
        checkpoints = s.scalar(
            text(
                "SELECT count(*) FROM checkpoints WHERE job_id = :j AND epoch = :e AND "
                "saved_at > (SELECT at FROM job_events WHERE job_id = :j "
                "AND kind = 'lease_expired')"
            ),
            {"j": job_id, "e": first_epoch},
        )
        output = s.scalar(
            text(
                "SELECT count(*) FROM job_logs WHERE job_id = :j AND epoch = :e AND "
                "at > (SELECT at FROM job_events WHERE job_id = :j AND kind = 'lease_expired')"
            ),
            {"j": job_id, "e": first_epoch},
        )
    assert late == 0 and checkpoints == 0
    # (its trainer's output, buffered while it was frozen, is refused like any other write)
    assert output == 0
    assert "lease lost" in frozen.log()


def test_a_more_urgent_job_is_taken_first(fleet: Fleet) -> None:
    # Given one worker, busy
    fleet.start_api()
    fleet.start_reaper()
    fleet.start_worker("worker-t4", fake_gpus="T4:16", host="host-b")
    fleet.wait_workers_ready(1)
    blocker = fleet.submit(small_job(name="blocker", faults={"step_delay_s": 0.05}))
    wait_for(lambda: fleet.job(blocker)["status"] == "running", timeout=60)
    # When a routine job and then an urgent one wait in the same queue
    routine = fleet.submit(small_job(name="routine", priority=1))
    urgent = fleet.submit(small_job(name="urgent", priority=9))
    final = fleet.wait_final([blocker, routine, urgent], timeout=120)
    # Then the urgent one runs first
    assert final[urgent]["started_at"] < final[routine]["started_at"]
