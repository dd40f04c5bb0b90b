"""Engine and session factory, one per process and database URL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.settings import get_settings

_factories: dict[str, sessionmaker[Session]] = {}
#: autocommit engines, by the engine they share a pool with (a test that drops a database
#: forgets its engine in ``_factories``; the next one gets a reader of its own).
_readers: dict[Engine, Engine] = {}

#: a pooled connection idle for longer than this is pinged before use.
PING_IDLE_S = 1.0


def _factory(url: str) -> sessionmaker[Session]:
    factory = _factories.get(url)
    if factory is None:
        settings = get_settings()
        pool: dict[str, Any] = (
            {"poolclass": NullPool}
            if settings.db_pool_size == 0
            else {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
        )
        engine = create_engine(url, connect_args=_connect_args(url), **pool)
        _ping_when_idle(engine)
        factory = _factories[url] = sessionmaker(engine, expire_on_commit=False)
    return factory


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use when it sat idle for ``PING_IDLE_S``: one that
    died with a database restart is replaced instead of failing a request. SQLAlchemy's
    ``pool_pre_ping`` pings before every use, a round trip per API request; a connection
    in steady use has just shown that it works (and a disconnect it meets invalidates the
    whole pool)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as err:
            raise exc.DisconnectionError(f"stale pooled connection: {err}") from err


def _connect_args(url: str) -> dict[str, Any]:
    """Fail fast on an unreachable server, and notice a dead peer through TCP keepalives,
    instead of waiting minutes for the kernel's defaults. Every connection gets the
    statement and lock timeouts of the settings, so a stuck statement or a lock held by a
    dead transaction fails loudly instead of stalling a heartbeat. A session idle inside a
    transaction for longer than a lease lasts is ended by the server
    (``idle_in_transaction_session_timeout`` = ``lease_ttl``): a worker frozen mid-transaction
    (SIGSTOP, a hung host) would otherwise hold its lease's rows locked for ever, and the
    reaper could never take the job back. psycopg never prepares
    statements on the server, which PgBouncer's transaction mode would hand to another client.
    """
    if not url.startswith("postgresql"):
        return {}
    settings = get_settings()
    return {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "prepare_threshold": None,
        "application_name": settings.db_application_name,
        "options": (
            f"-c statement_timeout={round(settings.db_statement_timeout * 1000)} "
            f"-c lock_timeout={round(settings.db_lock_timeout * 1000)} "
            "-c idle_in_transaction_session_timeout="
            f"{round(settings.lease_ttl * 1000)}"
        ),
    }


def timed_out(err: BaseException) -> bool:
    """The server answered, but ended the statement: a lock wait past ``lock_timeout`` or a
    statement past ``statement_timeout``. The database is there; a later try may pass."""
    cause = getattr(err, "orig", err)
    return isinstance(cause, (pg_errors.LockNotAvailable, pg_errors.QueryCanceled))


def engine_for(url: str) -> Engine:
    engine = _factory(url).kw["bind"]
    assert isinstance(engine, Engine)
    return engine


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with _factory(url).begin() as session:
        yield session


@contextmanager
def open_session(url: str) -> Iterator[Session]:
    """A session the caller commits itself (the API commits before it dispatches)."""
    with _factory(url)() as session:
        yield session


@contextmanager
def autocommit_connection(url: str) -> Iterator[Connection]:
    """A Core connection in autocommit, for work of one statement: a read sees its own
    snapshot, a write commits when it returns, and there is no BEGIN and COMMIT (or
    ROLLBACK) round trip around it (two of three), nor an ORM session (``app.db.driver``).
    The same pool as ``open_session`` (psycopg's autocommit is a client-side flag, reset when
    the connection goes back)."""
    engine = engine_for(url)
    reader = _readers.get(engine)
    if reader is None:
        reader = _readers[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
    with reader.connect() as connection:
        yield connection


def dispose_engines() -> None:
    """Forget pooled connections without closing them: a forked child must open its own."""
    for factory in _factories.values():
        bind = factory.kw["bind"]
        assert isinstance(bind, Engine)
        bind.dispose(close=False)
