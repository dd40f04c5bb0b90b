"""Helpers for the API tests: a real uvicorn server in a thread, SSE parsing, jobs and events
written the way workers write them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.api.app import create_app
from app.db.events import add_event
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import EventKind
from app.settings import Settings
from tests.e2e.fleet import free_port

SPEC = {"name": "t", "framework": "torch"}

#: the tokens of the in-process API tests: two tenants, an admin, a metrics scraper.
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
METRICS = {"Authorization": "Bearer metrics-token"}
AUTH = {
    "api_tokens": "alice:alice-token,bob:bob-token",
    "admin_tokens": "root:admin-token",
    "metrics_token": "metrics-token",
}


def authed_client(settings: Settings) -> TestClient:
    """The API in process, with the tokens above."""
    return TestClient(create_app(settings.model_copy(update=AUTH)))


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """The app on a real uvicorn server on a free port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass(frozen=True)
class Sse:
    id: str | None
    event: str
    data: Any


def sse_events(lines: Iterator[str]) -> Iterator[Sse]:
    """Parse an SSE stream (comments skipped) into its events."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if fields:
                yield Sse(
                    fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def new_job(database_url: str, tenant: str = "alice", status: str = "running") -> uuid.UUID:
    """A job (with its ``submitted`` event), put in ``status`` as a worker would."""
    with session_scope(database_url) as s:
        job_id = submit_job(session=s, tenant=tenant, spec=JobSpec.model_validate(SPEC)).job_id
        s.execute(text("UPDATE jobs SET status = :st WHERE id = :j"), {"st": status, "j": job_id})
    return job_id


def add_events(database_url: str, job_id: uuid.UUID, n: int, start: int = 0) -> None:
    with session_scope(database_url) as s:
        for i in range(start, start + n):
            add_event(session=s, job_id=job_id, kind=EventKind.CHECKPOINT, data={"i": i})


def finish(database_url: str, job_id: uuid.UUID) -> None:
    with session_scope(database_url) as s:
        s.execute(
            text("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :j"),
            {"j": job_id},
        )
        add_event(session=s, job_id=job_id, kind=EventKind.SUCCEEDED)


def stream_lines(client: httpx.Client, url: str, **kwargs: Any) -> Iterator[str]:
    with client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200, response.read()
        yield from response.iter_lines()
