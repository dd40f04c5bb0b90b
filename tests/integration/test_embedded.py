"""The embedded servers of ``gpufleet up``: data kept across restarts, one ``up`` per data
directory, and a picked port that another process took first traded for another."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest
import redis

from app import embedded
from app.embedded import DataDirLock, EmbeddedError, EmbeddedPostgres, EmbeddedRedis


def test_postgres_keeps_its_data_across_restarts(server_data_dir: Path) -> None:
    # Given a database with a row in it, on a server that then stops
    with EmbeddedPostgres(server_data_dir / "pg").start() as server:
        url = server.ensure_database("kept")
        with psycopg.connect(server.dsn("kept"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (42)")
    assert not (server_data_dir / "pg" / "pgdata" / "postmaster.pid").exists()
    # When it starts again on the same directory (on another port)
    with EmbeddedPostgres(server_data_dir / "pg").start() as server:
        # Then the database and its row are still there
        assert server.ensure_database("kept") != url
        with psycopg.connect(server.dsn("kept")) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [(42,)]


def test_a_data_directory_serves_one_up_at_a_time(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    with pytest.raises(EmbeddedError, match="another gpufleet up"):
        DataDirLock(tmp_path)
    first.release()
    DataDirLock(tmp_path).release()


def test_a_port_taken_before_the_server_binds_it_is_traded_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a port that looks free when picked, but that another process holds by the time
    # the server starts
    taken = socket.create_server(("127.0.0.1", 0))
    taken_port = taken.getsockname()[1]
    picks = iter([taken_port])
    real_free_port = embedded.free_port
    monkeypatch.setattr(
        embedded, "free_port", lambda host: next(picks, None) or real_free_port(host)
    )
    try:
        # When Redis starts on a picked port
        with EmbeddedRedis(tmp_path / "redis", durable=False).start() as server:
            # Then it runs on another one
            assert server.port != taken_port
            assert redis.Redis(port=server.port).ping()
    finally:
        taken.close()
