"""The GPU fleet end to end: device claims, best-fit routing, telemetry, Flower."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.fleet import Fleet, free_port, small_job, wait_for

pytestmark = pytest.mark.e2e

LEASE_TTL = 3.0


def _alive_claims(fleet: Fleet) -> dict[str, str]:
    return {d["uuid"]: d["worker"] for d in fleet.get("/v1/devices")["devices"] if d["alive"]}


def test_replicas_on_one_host_take_distinct_gpus_and_the_extra_one_waits(fleet: Fleet) -> None:
    # Given three identical workers on one host with two GPUs
    fleet.start_api()
    fleet.start_reaper()
    workers = [
        fleet.start_worker(f"worker-{n}", fake_gpus="A100:80,A100:80", host="shared")
        for n in range(3)
    ]
    # Then two claim distinct devices and the third waits, saying why
    claims = wait_for(
        lambda: len(_alive_claims(fleet)) == 2 and _alive_claims(fleet),
        timeout=60,
        what="two claims",
    )
    assert len(set(claims.values())) == 2
    waiting = wait_for(
        lambda: next((w for w in workers if "waiting for a device" in w.log()), None),
        timeout=30,
        what="the third worker to say it waits",
    )
    assert "held by live workers" in waiting.log()
    # When one claimant is killed
    holder = next(w for w in workers if w is not waiting and "claimed" in w.log())
    victim_device = next(u for u, name in claims.items() if name in holder.log())
    killed = time.monotonic()
    holder.signal_tree(signal.SIGKILL)
    # Then the waiting worker takes its device within the TTL (plus one claim retry)
    wait_for(
        lambda: "claimed " + victim_device in waiting.log(),
        timeout=LEASE_TTL + 10,
        what="the waiting worker to claim the freed device",
    )
    assert time.monotonic() - killed <= LEASE_TTL + 1.5 + 1.0
    assert len(_alive_claims(fleet)) == 2


def _parse(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def test_best_fit_keeps_the_big_gpu_for_big_jobs(fleet: Fleet) -> None:
    # Given an A100:80 and a T4:16 worker, both busy: the A100 with a short large job, the T4
    # with a longer small one (so the A100 frees up first)
    fleet.start_a100_and_t4()

    def job(name: str, memory_gb: int, epochs: int = 1) -> str:
        return fleet.submit(
            small_job(
                name=name,
                resources={"memory_gb": memory_gb},
                faults={"step_delay_s": 0.05},
                training={"epochs": epochs},
            )
        )

    first = job("big-0", 40)
    wait_for(lambda: fleet.job(first)["status"] == "running", timeout=60)
    second = job("small-0", 8, epochs=4)
    wait_for(lambda: fleet.job(second)["status"] == "running", timeout=60)
    # When a stream arrives with its small jobs first: first-come routing would hand the
    # A100, free first, the oldest waiting job (a small one) while large ones wait
    stream = [
        job(name, gb)
        for name, gb in [
            ("small-1", 8),
            ("small-2", 8),
            ("big-1", 40),
            ("big-2", 40),
            ("small-3", 8),
            ("big-3", 40),
        ]
    ]
    stream = [first, second, *stream]
    final = fleet.wait_final(stream, timeout=300)
    assert all(j["status"] == "succeeded" for j in final.values())
    types = {d["uuid"]: d["type"] for d in fleet.get("/v1/devices")["devices"]}
    # Then no large job waited while the A100 ran a small job the T4 could have run
    small_on_a100 = [
        (_parse(j["started_at"]), _parse(j["finished_at"]))
        for j in final.values()
        if j["name"].startswith("small") and types[j["leases"][-1]["device"]] == "A100"
    ]
    for job in final.values():
        if not job["name"].startswith("big"):
            continue
        waited = (_parse(job["created_at"]), _parse(job["started_at"]))
        for ran in small_on_a100:
            overlap = min(waited[1], ran[1]) - max(waited[0], ran[0])
            assert overlap <= 0, f"{job['name']} waited while the A100 ran a small job"
    assert sum(1 for j in final.values() if j["name"].startswith("small")) == 4


def test_devices_and_metrics_show_fresh_samples(fleet: Fleet) -> None:
    fleet.start_a100_and_t4()
    job_id = fleet.submit(small_job(faults={"step_delay_s": 0.05}))
    wait_for(lambda: fleet.job(job_id)["status"] == "running", timeout=60)
    interval = 1.0  # GPUFLEET_TELEMETRY_INTERVAL of the e2e fleet

    def fresh() -> bool:
        devices = fleet.get("/v1/devices")["devices"]
        return len(devices) == 2 and all(
            d["sample"] and time.time() - d["sample"]["taken_at"] < 2 * interval for d in devices
        )

    wait_for(fresh, timeout=10, what="samples younger than two intervals")
    devices = fleet.get("/v1/devices")["devices"]
    assert all(d["simulated"] and d["sample"]["simulated"] for d in devices)
    metrics = httpx.get(f"{fleet.api_url}/metrics", timeout=10).text
    for device in devices:
        assert f'uuid="{device["uuid"]}"' in metrics
    assert "DCGM_FI_DEV_GPU_UTIL" in metrics
    job = fleet.wait_final([job_id], timeout=120)[job_id]
    assert job["gpu"]["mean_utilization"] > 0.5  # simulated busy samples


def test_flower_lists_the_workers_and_the_tasks_they_ran(fleet: Fleet) -> None:
    fleet.start_api()
    fleet.start_reaper()
    fleet.start_worker("worker-a100", fake_gpus="A100:80", host="host-a")
    fleet.wait_workers_ready(1)
    port = free_port()
    env = {**fleet.env, "FLOWER_BASIC_AUTH": "admin:secret"}
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app.queue:flower_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        auth = ("admin", "secret")
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200
            return False

        wait_for(up, timeout=30, what="flower")
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401
        job_id = fleet.submit(small_job())
        fleet.wait_final([job_id], timeout=120)

        def seen() -> Any:
            tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=5).json()
            return [t for t in tasks.values() if t.get("args") and job_id in t["args"]]

        tasks = wait_for(seen, timeout=30, what="flower to list the task")
        assert tasks[0]["worker"].startswith("A100-0@host-a")
        workers = httpx.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=15).json()
        assert any(name.startswith("A100-0@host-a") for name in workers), workers
    finally:
        os.killpg(flower.pid, signal.SIGKILL)
        flower.wait()
