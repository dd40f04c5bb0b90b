"""``gpufleet up`` (the README's run command) starts a fleet that answers and stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.fleet import descendants, free_port, small_job, wait_for

pytestmark = pytest.mark.e2e


def test_up_runs_api_reaper_and_a_worker_per_gpu(fleet_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**fleet_env, "GPUFLEET_FAKE_GPUS": "A100:80,T4:16", "GPUFLEET_HOSTNAME": "up-host"}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=60, what="/healthz")

        def alive_devices() -> list[dict[str, object]] | None:
            devices = httpx.get(f"{base}/v1/devices").json()["devices"]
            alive = [d for d in devices if d["alive"]]
            return alive if len(alive) == 2 else None

        devices = wait_for(alive_devices, timeout=60, what="a worker per simulated GPU")
        assert sorted(d["type"] for d in devices) == ["A100", "T4"]
        job_id = httpx.post(f"{base}/v1/jobs", json=small_job()).json()["id"]
        wait_for(
            lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "succeeded",
            timeout=120,
            what="a job to succeed",
        )
        children = descendants(up.pid)
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
        timeout=30,
        what="every process of the fleet to exit",
    )
