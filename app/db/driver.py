"""A statement through psycopg's own cursor on a pooled SQLAlchemy connection, for the API's
busiest requests: submit, get and the list page, one statement each.

Measured on a get's worker thread (checkout, one statement, the JSON of the job), per
request: an ORM session 0.57-1.08 ms of CPU, a Core connection 0.51-0.72 ms, this
0.32-0.39 ms; a submit's insert 0.88-0.99 ms through a session (and its BEGIN and COMMIT),
0.39-0.45 ms this way in autocommit. SQLAlchemy's execution builds a result object and its
metadata around every statement, and psycopg describes all 24 columns again for it; here the
rows come back as tuples. The connection is still SQLAlchemy's: its checkout (the ping of an
idle one), its isolation level and its return to the pool are unchanged, and a driver error
goes through SQLAlchemy's own handling, so an unreachable database is the same
``OperationalError`` (the API's 503) and a dead connection invalidates the pool as it would
through ``execute``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

_DIALECT = PGDialect_psycopg()  # type: ignore[no-untyped-call]


def driver_sql(statement: TextClause | TextualSelect) -> str:
    """A text statement as SQLAlchemy would send it to psycopg (``%(name)s`` placeholders, the
    casts of its typed parameters): one source for both paths."""
    return str(statement.compile(dialect=_DIALECT))


def fetch_all(connection: Connection, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (psycopg's ``%(name)s`` placeholders) as tuples. Listeners of the
    engine's ``before_cursor_execute`` and ``after_cursor_execute`` still see the statement
    (without an execution context): tests that count statements, tracing."""
    dbapi = connection.connection.driver_connection
    assert dbapi is not None
    cursor = None
    events = connection._has_events or connection.engine._has_events
    try:
        cursor = dbapi.cursor()
        if events:
            for listener in connection.dispatch.before_cursor_execute:
                sql, params = listener(connection, cursor, sql, params, None, False)
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        if events:
            connection.dispatch.after_cursor_execute(connection, cursor, sql, params, None, False)
        return rows
    except connection.dialect.loaded_dbapi.Error as err:
        # Wraps it (OperationalError, ...), invalidates a dead connection and the pool, raises.
        connection._handle_dbapi_exception(err, sql, params, cursor, None)
        raise  # not reached: the handler always raises
    finally:
        if cursor is not None:
            cursor.close()
