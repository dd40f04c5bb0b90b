"""``gpufleet up`` (the README's run command): a fleet that answers, runs jobs, keeps them across
restarts with its own PostgreSQL and Redis, starts again a worker that stopped, and stops
cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.fleet import cmdline, descendants, free_port, small_job, wait_for

pytestmark = pytest.mark.e2e


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Up:
    """One ``gpufleet up`` process and its API."""

    popen: subprocess.Popen[bytes]
    base: str
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, *args: str) -> Up:
        port = free_port()
        log = log_path.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        up = cls(popen, f"http://127.0.0.1:{port}", log_path)
        wait_for(up.healthy, timeout=90, what=f"/healthz\n{up.log()}")
        return up

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def healthy(self) -> bool:
        assert self.popen.poll() is None, self.log()
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.base}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_devices(self, count: int) -> list[dict[str, Any]]:
        def alive() -> list[dict[str, Any]] | None:
            devices = [d for d in self.get("/v1/devices")["devices"] if d["alive"]]
            return devices if len(devices) == count else None

        found: list[dict[str, Any]] = wait_for(
            alive, timeout=90, what=f"{count} workers to claim devices"
        )
        return found

    def run_job(self, **overrides: Any) -> str:
        response = httpx.post(f"{self.base}/v1/jobs", json=small_job(**overrides), timeout=10)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        wait_for(
            lambda: self.get(f"/v1/jobs/{job_id}")["status"] == "succeeded",
            timeout=120,
            what=f"job {job_id} to succeed\n{self.log()}",
        )
        return job_id

    def workers(self) -> list[int]:
        """The worker processes `up` started (not the Celery pool processes under them)."""
        return [
            pid
            for pid in descendants(self.popen.pid)
            if "app.cli worker" in cmdline(pid) and _parent(pid) == self.popen.pid
        ]

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C or `docker stop`; returns the exit code once every process of
        the fleet, servers included, is gone."""
        children = descendants(self.popen.pid)
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(timeout=90)
        wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
            timeout=30,
            what="every process of the fleet to exit",
        )
        return code


def test_up_runs_api_reaper_and_a_worker_per_gpu(fleet_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **fleet_env,
        "GPUFLEET_FAKE_GPUS": "A100:80,T4:16",
        "GPUFLEET_HOSTNAME": "up-host",
        "GPUFLEET_WARM_SPARE": "1",  # (the README's run command, as it comes)
    }
    up = Up.start(env, tmp_path / "up.log")
    try:
        devices = up.alive_devices(2)
        assert sorted(d["type"] for d in devices) == ["A100", "T4"]
        up.run_job()
    finally:
        code = up.stop()
    assert code == 0, up.log()


def test_up_without_urls_runs_its_own_postgres_and_redis_and_keeps_jobs_across_restarts(
    fleet_env: dict[str, str], tmp_path: Path, server_data_dir: Path
) -> None:
    # Given no database or broker URL, only a data directory
    env = {
        key: value
        for key, value in fleet_env.items()
        if key not in ("GPUFLEET_DATABASE_URL", "GPUFLEET_BROKER_URL")
    }
    env.update({"GPUFLEET_FAKE_GPUS": "A100:80", "GPUFLEET_HOSTNAME": "embedded-host"})
    data_dir = server_data_dir / "data"
    # When `up` starts, a job runs to success on the fleet's own servers
    up = Up.start(env, tmp_path / "up.log", "--data-dir", str(data_dir))
    try:
        up.alive_devices(1)
        job_id = up.run_job(name="kept")
        servers = [
            pid
            for pid in descendants(up.popen.pid)
            if cmdline(pid).split(" ")[0].endswith("/postgres")
        ]
        assert servers and all(str(data_dir) in cmdline(pid) for pid in servers)
    finally:
        assert up.stop() == 0, up.log()
    # Then its PostgreSQL stopped with it, cleanly (no server left on the data directory)
    assert not (data_dir / "postgres" / "pgdata" / "postmaster.pid").exists()
    # And after a restart the job is still listed, and the fleet still runs jobs
    up = Up.start(env, tmp_path / "up.log", "--data-dir", str(data_dir))
    try:
        jobs = up.get("/v1/jobs")["jobs"]
        assert [(j["id"], j["status"]) for j in jobs] == [(job_id, "succeeded")]
        up.alive_devices(1)
        up.run_job(name="after-restart")
    finally:
        assert up.stop() == 0, up.log()


def test_up_starts_again_a_worker_that_stopped(fleet_env: dict[str, str], tmp_path: Path) -> None:
    # Given a fleet with one worker
    env = {**fleet_env, "GPUFLEET_FAKE_GPUS": "A100:80", "GPUFLEET_HOSTNAME": "restart-host"}
    up = Up.start(env, tmp_path / "up.log")
    try:
        up.alive_devices(1)
        [worker] = up.workers()
        # When the worker dies (kill -9 of it and its children)
        os.killpg(worker, signal.SIGKILL)
        # Then `up` starts a new one, which claims the device once the old claim expires
        new = wait_for(
            lambda: [pid for pid in up.workers() if pid != worker],
            timeout=30,
            what=f"a new worker\n{up.log()}",
        )
        assert len(new) == 1
        assert "worker-0 (pid" in up.log() and "was killed by SIGKILL" in up.log()
        # And it runs jobs
        up.run_job()
    finally:
        assert up.stop() == 0, up.log()
