"""The user commands against a real API server (uvicorn in a thread, real Postgres/Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
import yaml
from typer.testing import CliRunner

from app.api.app import create_app
from app.cli import cli
from app.settings import Settings
from tests.e2e.fleet import free_port

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
    result = runner.invoke(cli, list(args), env={"GPUFLEET_API_URL": api_url})
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
