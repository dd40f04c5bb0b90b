"""A worker process's threads share one pooled connection plus a small overflow."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, text

from app.db.session import session_scope
from app.settings import get_settings
from tests.conftest import pgbouncer
from workers.main import use_worker_pool


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (
        "GPUFLEET_DB_POOL_SIZE",
        "GPUFLEET_DB_MAX_OVERFLOW",
        "GPUFLEET_DB_APPLICATION_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    use_worker_pool()
    yield
    get_settings.cache_clear()


def test_worker_threads_hold_at_most_three_connections(worker_env: None, db_url: str) -> None:
    def busy() -> None:
        for _ in range(20):
            with session_scope(db_url) as session:
                session.execute(text("SELECT pg_sleep(0.005)"))

    threads = [threading.Thread(target=busy) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= _held(db_url) <= 3


def _held(db_url: str) -> int:
    """The connections this process holds, seen by the server it talks to: Postgres, or the
    suite's PgBouncer (whose server connections serve every client in turn)."""
    database = make_url(db_url).database
    bouncer = pgbouncer()
    if bouncer is not None:
        return sum(
            1
            for c in bouncer.clients()
            if c["database"] == database and c.get("application_name") == "gpufleet-worker"
        )
    with session_scope(db_url) as session:
        return (
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'gpufleet-worker' AND datname = current_database()"
                )
            )
            or 0
        )
