"""A fleet of real processes for end-to-end tests: API, reaper and workers, as ``gpufleet up``
starts them, each a plain process with its own log file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.conftest import ROOT

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tree(self) -> list[int]:
        return [self.popen.pid, *descendants(self.popen.pid)]

    def signal_tree(self, sig: signal.Signals) -> None:
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    env: dict[str, str]
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    api_url: str = ""
    _api_ready: bool = False

    def _start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_api(self) -> Proc:
        """Start the API; the first request through this fleet waits until it answers, so the
        other processes start meanwhile."""
        port = free_port()
        proc = self._start("api", ["api", "--port", str(port)])
        self.api_url = f"http://127.0.0.1:{port}"
        self._api_ready = False
        return proc

    def wait_api(self) -> None:
        if not self._api_ready:
            wait_for(self._healthy, timeout=60, what="the API's /healthz")
            self._api_ready = True

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_reaper(self) -> Proc:
        return self._start("reaper", ["reaper"])

    def start_worker(
        self, name: str, *, fake_gpus: str, host: str, env: dict[str, str] | None = None
    ) -> Proc:
        return self._start(
            name,
            ["worker"],
            {"GPUFLEET_FAKE_GPUS": fake_gpus, "GPUFLEET_HOSTNAME": host, **(env or {})},
        )

    def start_a100_and_t4(self) -> dict[str, Proc]:
        """API, reaper, an ``A100:80`` worker on host-a and a ``T4:16`` worker on host-b."""
        self.start_api()
        self.start_reaper()
        workers = {
            "host-a": self.start_worker("worker-a100", fake_gpus="A100:80", host="host-a"),
            "host-b": self.start_worker("worker-t4", fake_gpus="T4:16", host="host-b"),
        }
        self.wait_workers_ready(2)
        return workers

    def start_two_a100s(self) -> dict[str, Proc]:
        """API, reaper and two ``A100:80`` workers on host-1 and host-2, keyed by host."""
        self.start_api()
        self.start_reaper()
        workers = {
            host: self.start_worker(f"worker-{host}", fake_gpus="A100:80", host=host)
            for host in ("host-1", "host-2")
        }
        self.wait_workers_ready(2)
        return workers

    def holder(self, job_id: str, workers: dict[str, Proc]) -> Proc:
        """The worker process that holds the job's lease (waits for one)."""
        lease = wait_for(lambda: self.job(job_id)["lease"], timeout=60, what="a lease")
        return workers[lease["worker"].rsplit("@", 1)[1]]

    def wait_workers_ready(self, count: int, timeout: float = 60) -> None:
        def ready() -> bool:
            devices = self.get("/v1/devices")["devices"]
            return sum(1 for d in devices if d["alive"]) >= count

        wait_for(ready, timeout=timeout, what=f"{count} workers to claim devices")
        # Celery needs a moment after the claim to start consuming.
        wait_for(
            lambda: (
                sum("ready." in p.log() for p in self.procs if p.name.startswith("worker")) >= count
            ),
            timeout=timeout,
            what="celery workers ready",
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.signal_tree(signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)

    # -- the API ---------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        self.wait_api()
        response = httpx.get(f"{self.api_url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def submit(self, spec: dict[str, Any]) -> str:
        self.wait_api()
        response = httpx.post(f"{self.api_url}/v1/jobs", json=spec, timeout=10)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}")
        return job

    def wait_final(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        final: dict[str, dict[str, Any]] = {}

        def all_final() -> bool:
            for job_id in job_ids:
                if job_id not in final:
                    job = self.job(job_id)
                    if job["status"] in ("succeeded", "failed", "cancelled"):
                        final[job_id] = job
            return len(final) == len(job_ids)

        try:
            wait_for(all_final, timeout=timeout, interval=0.5, what="jobs to finish")
        except AssertionError:
            pending = {j: self.job(j)["status"] for j in job_ids if j not in final}
            logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in self.procs)
            raise AssertionError(f"jobs not final: {pending}\n{logs}") from None
        return final


def small_job(**overrides: Any) -> dict[str, Any]:
    """A job that trains in a second or two on a CPU."""
    spec: dict[str, Any] = {
        "name": "e2e",
        "framework": "torch",
        "model": {"type": "mlp", "input_dim": 8, "hidden_units": [16], "output_dim": 1},
        "data": {"source": "synthetic", "samples": 2000, "seed": 0},
        "training": {
            "epochs": 2,
            "batch_size": 100,
            "learning_rate": 0.01,
            "seed": 0,
            "checkpoint_every_steps": 10,
        },
        "resources": {"gpu_type": "any", "memory_gb": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
