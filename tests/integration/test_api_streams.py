"""Events and logs: cursor pages, live SSE streams that resume and never skip a row."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.db.events import add_event
from app.db.logs import append_log
from app.db.session import engine_for, session_scope
from app.domain.states import EventKind
from app.settings import Settings
from tests.integration.api_support import (
    add_events,
    finish,
    new_job,
    serve,
    sse_events,
    stream_lines,
)

ALICE = {"Authorization": "Bearer alice-token"}
SSE = {**ALICE, "Accept": "text/event-stream"}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_tokens": "alice:alice-token"})


def test_a_job_with_5000_events_shows_its_final_event(api_settings: Settings) -> None:
    url = api_settings.database_url
    job_id = new_job(url)
    add_events(url, job_id, 4998)
    finish(url, job_id)  # event 5000
    client = TestClient(create_app(api_settings))
    seqs: list[int] = []
    kinds: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/jobs/{job_id}/events", params=params, headers=ALICE).json()
        seqs += [e["seq"] for e in page["events"]]
        kinds += [e["kind"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seqs == list(range(1, 5001)) and kinds[-1] == "succeeded"
    # The live stream of an ended job sends everything, then says it ended.
    with serve(create_app(api_settings)) as base, httpx.Client(base_url=base) as http:
        got = list(sse_events(stream_lines(http, f"/v1/jobs/{job_id}/events", headers=SSE)))
    assert [int(e.id) for e in got[:-1] if e.id] == list(range(1, 5001))
    assert got[-2].event == "succeeded" and got[-1].event == "end"
    assert got[-1].data["status"] == "succeeded"


def test_an_interrupted_stream_resumes_from_last_event_id(api_settings: Settings) -> None:
    url = api_settings.database_url
    job_id = new_job(url)
    add_events(url, job_id, 29)  # seq 1..30 with the submitted event
    seen: list[int] = []
    with serve(create_app(api_settings)) as base, httpx.Client(base_url=base) as http:
        for e in sse_events(stream_lines(http, f"/v1/jobs/{job_id}/events", headers=SSE)):
            seen.append(int(e.id or 0))
            if len(seen) == 12:
                break  # the connection drops
        add_events(url, job_id, 10, start=100)  # written while nobody listens

        def later() -> None:
            time.sleep(0.5)
            add_events(url, job_id, 5, start=200)
            finish(url, job_id)

        writer = threading.Thread(target=later)
        writer.start()
        resumed = stream_lines(
            http, f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": str(seen[-1])}
        )
        events = list(sse_events(resumed))
        writer.join()
    seen += [int(e.id) for e in events if e.id]
    assert seen == list(range(1, 47)), seen  # 30 + 10 + 5 + the final event, once each
    assert events[-1].event == "end"


def test_concurrent_writers_never_make_a_follower_skip_a_row(api_settings: Settings) -> None:
    """Writers whose transactions commit out of insert order: an id cursor skips rows; the
    per-job sequence, given under the job's row lock, never does."""
    url = api_settings.database_url
    job_id = new_job(url)
    per_writer, writers = 40, 4

    def write(n: int) -> None:
        rng = random.Random(n)
        for i in range(per_writer):
            with session_scope(url) as s:
                add_event(
                    session=s, job_id=job_id, kind=EventKind.CHECKPOINT, data={"w": n, "i": i}
                )
                time.sleep(rng.uniform(0, 0.02))  # commit late, sometimes

    with serve(create_app(api_settings)) as base, httpx.Client(base_url=base) as http:
        got: list[Any] = []

        def follow() -> None:
            got.extend(sse_events(stream_lines(http, f"/v1/jobs/{job_id}/events", headers=SSE)))

        follower = threading.Thread(target=follow)
        follower.start()
        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finish(url, job_id)
        follower.join(timeout=30)
    written = {(e["w"], e["i"]) for e in (g.data["data"] for g in got if g.event == "checkpoint")}
    assert len(written) == per_writer * writers
    ids = [int(g.id) for g in got if g.id]
    assert ids == list(range(1, per_writer * writers + 3))  # submitted .. succeeded, in order


def test_logs_page_and_follow(api_settings: Settings) -> None:
    url = api_settings.database_url
    job_id = new_job(url)
    with session_scope(url) as s:
        epoch = s.execute(
            __import__("sqlalchemy").text(
                "UPDATE jobs SET epoch = 1 WHERE id = :j RETURNING epoch"
            ),
            {"j": job_id},
        ).scalar_one()
        for i in range(250):
            assert append_log(session=s, job_id=job_id, epoch=epoch, chunk=f"line {i}\n")
    finish(url, job_id)
    client = TestClient(create_app(api_settings))
    body, cursor, pages = "", None, 0
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/jobs/{job_id}/logs", params=params, headers=ALICE).json()
        body += page["text"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = "".join(f"line {i}\n" for i in range(250))
    assert body == expected and pages == 3
    whole = client.get(f"/v1/jobs/{job_id}/logs", headers={**ALICE, "Accept": "text/plain"})
    assert whole.text == expected
    with serve(create_app(api_settings)) as base, httpx.Client(base_url=base) as http:
        got = list(
            sse_events(
                stream_lines(
                    http,
                    f"/v1/jobs/{job_id}/logs",
                    params={"follow": "true"},
                    headers={**SSE, "Last-Event-ID": "200"},
                )
            )
        )
    followed = "".join(e.data["text"] for e in got if e.event == "log")
    assert followed == "".join(f"line {i}\n" for i in range(200, 250))  # seq 201..250
    assert got[-1].event == "end"


def test_a_follower_gets_keep_alives_and_holds_no_database_connection(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.api.streams as streams

    monkeypatch.setattr(streams, "KEEPALIVE_S", 0.3)
    url = api_settings.database_url
    job_ids = [new_job(url) for _ in range(30)]
    app = create_app(api_settings)
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        lines: list[list[str]] = [[] for _ in job_ids]
        started = threading.Semaphore(0)

        def follow(k: int, job_id: uuid.UUID) -> None:
            for line in stream_lines(http, f"/v1/jobs/{job_id}/events", headers=SSE):
                lines[k].append(line)
                if line.startswith("id: "):
                    started.release()
                if line == ": keep-alive":
                    return

        threads = [threading.Thread(target=follow, args=kv) for kv in enumerate(job_ids)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=20)  # every follower has its first event
        pool = engine_for(url).pool
        checked_out = min(
            (pool.checkedout(), time.sleep(0.02))[0]  # type: ignore[attr-defined]
            for _ in range(15)
        )
        for t in threads:
            t.join(timeout=10)
    # 30 followers waiting: no connection held by any of them (the poller's is brief)
    assert checked_out <= 1
    assert all(": keep-alive" in got for got in lines)
