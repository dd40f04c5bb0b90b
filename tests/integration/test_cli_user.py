"""The user commands against a real API server (uvicorn in a thread, real Postgres/Redis)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from app.api.app import create_app
from app.cli import cli
from app.db.devices import register_devices
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.conftest import device_record
from tests.e2e.fleet import free_port
from tests.integration.api_support import add_events, finish, new_job, serve

runner = CliRunner()

SPEC = {
    "name": "cli-demo",
    "framework": "torch",
    "model": {"type": "mlp", "input_dim": 8, "hidden_units": [16], "output_dim": 1},
    "resources": {"gpu_type": "any", "memory_gb": 8},
}


@pytest.fixture
def api_url(settings: Settings) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def gpufleet(api_url: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, list(args), env={"GPUFLEET_API_URL": api_url, "GPUFLEET_TOKEN": ""})
    return result.exit_code, result.stdout, result.stderr


def test_submit_status_list_cancel(api_url: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    code, out, err = gpufleet(api_url, "submit", str(spec_file))
    assert code == 0, err
    job_id = out.strip()
    assert len(job_id) == 36
    assert "no devices are registered" in err  # it waits, and says why
    code, out, _ = gpufleet(api_url, "status", job_id, "--json")
    assert code == 0 and '"status": "queued"' in out
    code, out, _ = gpufleet(api_url, "list")
    assert code == 0 and "cli-demo" in out
    code, out, _ = gpufleet(api_url, "cancel", job_id)
    assert code == 0 and f"{job_id}: cancelled" in out
    code, _, err = gpufleet(api_url, "cancel", job_id)
    assert code == 1 and "409" in err and "already cancelled" in err


def test_errors_are_messages_not_tracebacks(api_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "resources": {"memory_gb": -1}}))
    code, _, err = gpufleet(api_url, "submit", str(bad))
    assert code == 1 and "resources.memory_gb" in err and "Traceback" not in err
    code, _, err = gpufleet(api_url, "submit", str(tmp_path / "missing.yaml"))
    assert code == 1 and "cannot read" in err
    code, _, err = gpufleet(api_url, "status", "0c8e3b1e-0000-0000-0000-000000000000")
    assert code == 1 and "404" in err
    code, _, err = gpufleet("http://127.0.0.1:1", "list")
    assert code == 1 and "cannot reach the API" in err


class DropFirstResponse:
    """A TCP proxy that forwards the first request and drops its connection before the answer
    comes back (the API took the job and died, as far as the client can tell); later
    connections pass through."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            if self.dropped == 0:
                self.dropped += 1
                threading.Thread(target=self._drop, args=(client, server), daemon=True).start()
                continue
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _drop(self, client: socket.socket, server: socket.socket) -> None:
        client.settimeout(0.5)
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)
        server.recv(1)  # the API answered: the job is stored
        client.close()
        server.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


def test_submit_retries_through_a_dropped_connection_and_stores_one_job(
    api_url: str, tmp_path: Path, settings: Settings
) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    port = int(api_url.rsplit(":", 1)[1])
    proxy = DropFirstResponse(("127.0.0.1", port))
    code, out, err = gpufleet(f"http://127.0.0.1:{proxy.port}", "submit", str(spec_file))
    assert code == 0, err
    assert proxy.dropped == 1
    with session_scope(settings.database_url) as s:
        ids = s.scalars(text("SELECT id::text FROM jobs")).all()
    assert ids == [out.strip()]  # stored once, and the client learned its id


def test_prefixes_json_list_all_events_validate_and_where_a_job_ran(
    api_url: str, tmp_path: Path, settings: Settings
) -> None:
    with session_scope(settings.database_url) as s:
        ids = [
            str(submit_job(session=s, tenant="default", spec=JobSpec.model_validate(SPEC)).job_id)
            for _ in range(205)
        ]
        register_devices(session=s, devices=[device_record("GPU-a", index=3)])
        s.execute(
            text(
                "INSERT INTO leases (job_id, epoch, worker, device_uuid, expires_at) "
                "VALUES (:j, 1, 'worker-7', 'GPU-a', now() + interval '1 minute')"
            ),
            {"j": ids[0]},
        )
    code, out, err = gpufleet(api_url, "list", "--all", "--json")
    assert code == 0, err
    assert sorted(j["id"] for j in json.loads(out)) == sorted(ids)
    newest = json.loads(gpufleet(api_url, "list", "--limit", "3", "--json")[1])
    code, out, _ = gpufleet(api_url, "list", "--limit", "3")
    assert code == 0 and all(j["id"] in out for j in newest)  # full ids, even at 80 columns
    code, out, err = gpufleet(api_url, "status", ids[0][:8])
    assert code == 0, err
    assert ids[0] in out and "GPU 3 of h" in out and "worker-7" in out
    code, out, _ = gpufleet(api_url, "status", ids[0][:8], "--json")
    assert json.loads(out)["leases"][0]["host"] == "h"
    code, out, _ = gpufleet(api_url, "events", ids[0][:8], "--json")
    assert code == 0 and [e["kind"] for e in json.loads(out)] == ["submitted"]
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    code, out, _ = gpufleet(api_url, "validate", str(spec_file))
    assert code == 0 and "queue gpu.any.8" in out and "GPU 3 of h" in out
    code, out, _ = gpufleet(api_url, "--version")
    assert code == 0 and out.startswith("gpufleet ")


def test_api_url_and_token_options(settings: Settings, tmp_path: Path) -> None:
    app = create_app(settings.model_copy(update={"api_tokens": "alice:alice-token"}))
    with serve(app) as url:
        result = runner.invoke(cli, ["--api-url", url, "--token", "alice-token", "list"], env={})
        assert result.exit_code == 0, result.stderr
        result = runner.invoke(cli, ["--api-url", url, "--token", "wrong", "list"], env={})
        assert result.exit_code == 1 and "401" in result.stderr


def test_a_followed_stream_reconnects_until_the_job_ends(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.api.streams as streams

    monkeypatch.setattr(streams, "MAX_S", 0.3)  # the server asks clients to reconnect often
    job_id = new_job(settings.database_url, tenant="default")

    def write() -> None:
        for n in range(5):
            time.sleep(0.25)
            add_events(settings.database_url, job_id, 3, start=10 * n)
        finish(settings.database_url, job_id)

    with serve(create_app(settings)) as url:
        writer = threading.Thread(target=write)
        writer.start()
        code, out, err = gpufleet(url, "events", str(job_id)[:8], "--follow", "--json")
        writer.join()
    assert code == 0, err
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert seqs == list(range(1, 18))  # submitted, 15 checkpoints, succeeded: each once
