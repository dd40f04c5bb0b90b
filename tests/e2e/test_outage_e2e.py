"""A database outage longer than every timer: the fleet comes back by itself, and the job it
was running finishes without the outage costing it an attempt."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ROOT
from tests.e2e.fleet import free_port, small_job, wait_for
from tests.outage import CuttableProxy

pytestmark = pytest.mark.e2e

#: the defaults' shape (lease 60 s, heartbeat 10 s, reaper 15 s), scaled down ten times.
TIMINGS = {
    "GPUFLEET_LEASE_TTL": "6",
    "GPUFLEET_HEARTBEAT_INTERVAL": "1",
    "GPUFLEET_REAPER_INTERVAL": "1.5",
    "GPUFLEET_REDISPATCH_AFTER": "6",
}
OUTAGE_S = 35.0


def test_a_35s_database_outage_costs_no_attempt_and_the_fleet_comes_back(
    fleet_env: dict[str, str], tmp_path: Path
) -> None:
    # Given `gpufleet up` (API, reaper, one worker) reaching Postgres through a proxy, running
    # a job that checkpoints as it goes
    url = make_url(fleet_env["GPUFLEET_DATABASE_URL"])
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    env = {
        **fleet_env,
        **TIMINGS,
        "GPUFLEET_DATABASE_URL": through_proxy,
        "GPUFLEET_FAKE_GPUS": "A100:80",
        "GPUFLEET_HOSTNAME": "outage-host",
    }
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def job(job_id: str) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    try:
        wait_for(lambda: _answers(f"{base}/healthz"), timeout=60, what="/healthz")
        spec = small_job(
            training={"epochs": 6, "checkpoint_every_steps": 5}, faults={"step_delay_s": 0.25}
        )
        job_id = httpx.post(f"{base}/v1/jobs", json=spec, timeout=10).json()["id"]
        wait_for(
            lambda: ((job(job_id) or {}).get("progress") or {}).get("step", 0) >= 6,
            timeout=90,
            what="the job to train past a checkpoint",
        )
        # When the database is unreachable for longer than the lease, the watchdogs and the
        # reaper's grace together
        proxy.cut()
        time.sleep(OUTAGE_S)
        proxy.restore()
        back_at = time.monotonic()
        # Then the fleet runs the job again within seconds of the database's return
        lease_ttl = float(TIMINGS["GPUFLEET_LEASE_TTL"])
        wait_for(
            lambda: (
                (j := job(job_id)) is not None
                and j["status"] == "running"
                and len(j["leases"]) >= 2
            ),
            timeout=lease_ttl + 30,
            what="the job to run again",
        )
        again_after = time.monotonic() - back_at
        final = wait_for(
            lambda: (j := job(job_id)) is not None and j["status"] in ("succeeded", "failed") and j,
            timeout=180,
            what="the job to end",
        )
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
    assert final["status"] == "succeeded", (tmp_path / "up.log").read_text()[-4000:]
    # And the outage cost it no attempt: the try it interrupted was given back for free
    assert final["attempts"] == 1, final["leases"]
    assert again_after <= lease_ttl + 20, f"ran again {again_after:.1f}s after the outage"
    print(f"running again {again_after:.1f}s after the database came back")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
