"""A pooled connection that died while idle is replaced before use; a busy one is not pinged."""

from __future__ import annotations

import os
import time

import psycopg
import pytest
from sqlalchemy import text

from app.db import session as db_session
from app.db.session import engine_for, session_scope


def _backend_pid(db_url: str) -> int:
    with session_scope(db_url) as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.skipif(
    os.environ.get("GPUFLEET_TEST_PGBOUNCER", "0") == "1",
    reason="behind PgBouncer the pool holds connections to PgBouncer, not to a backend this "
    "test could kill; PgBouncer replaces its own dead server connections",
)
def test_a_connection_killed_while_idle_is_replaced(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_session, "PING_IDLE_S", 0.2)
    pid = _backend_pid(db_url)
    dsn = engine_for(db_url).url.set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(dsn, autocommit=True) as other:  # outside the pool
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.3)
    pids = {_backend_pid(db_url) for _ in range(3)}  # no error: the dead one was replaced
    assert pid not in pids


def test_a_connection_in_steady_use_is_not_pinged(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(db_url)
    pings: list[object] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    for _ in range(5):
        _backend_pid(db_url)
    assert pings == []
    monkeypatch.setattr(db_session, "PING_IDLE_S", 0.0)
    _backend_pid(db_url)
    assert len(pings) == 1
