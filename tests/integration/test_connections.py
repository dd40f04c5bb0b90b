"""Every gpufleet connection carries the settings' timeouts and keeps no server-side state that
PgBouncer's transaction mode would hand to another client."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import make_url, text

from app.db.session import engine_for, session_scope
from app.settings import Settings, get_settings
from tests.conftest import pg_address, pgbouncer


def test_connections_have_the_timeouts_of_the_settings_and_never_prepare(
    settings: Settings,
) -> None:
    configured = get_settings()  # the process's settings (GPUFLEET_* or the defaults)
    with session_scope(settings.database_url) as s:
        statement = s.scalar(text("SELECT current_setting('statement_timeout')"))
        lock = s.scalar(text("SELECT current_setting('lock_timeout')"))
        idle = s.scalar(text("SELECT current_setting('idle_in_transaction_session_timeout')"))
        for _ in range(10):  # more than psycopg's default prepare threshold (5)
            s.execute(text("SELECT 1 WHERE 1 = :one"), {"one": 1})
        prepared = s.scalar(text("SELECT count(*) FROM pg_prepared_statements"))
    ms = {"statement": round(configured.db_statement_timeout * 1000)}
    ms["lock"] = round(configured.db_lock_timeout * 1000)
    assert _ms(statement) == ms["statement"] and ms["statement"] > 0
    assert _ms(lock) == ms["lock"] and ms["lock"] > 0
    # a session frozen inside a transaction lets its locks go once a lease would have expired
    assert _ms(idle) == round(configured.lease_ttl * 1000) > 0
    assert prepared == 0
    raw = engine_for(settings.database_url).raw_connection()
    try:
        assert raw.driver_connection.prepare_threshold is None  # type: ignore[union-attr]
    finally:
        raw.close()


def _ms(value: str) -> int:
    """Postgres shows '1min', '10s' or '250ms'."""
    for unit, factor in (("min", 60_000), ("ms", 1), ("s", 1000), ("h", 3_600_000)):
        if value.endswith(unit):
            return int(value[: -len(unit)]) * factor
    return int(value)


@pytest.mark.skipif(
    os.environ.get("GPUFLEET_TEST_PGBOUNCER", "0") != "1", reason="the suite's PgBouncer pass"
)
def test_the_pgbouncer_pass_runs_through_pgbouncer_in_transaction_mode(
    settings: Settings,
) -> None:
    """With GPUFLEET_TEST_PGBOUNCER=1 the code under test reaches Postgres through PgBouncer in
    transaction mode, and the timeouts it cannot pass on come from the role."""
    bouncer = pgbouncer()
    assert bouncer is not None
    url = make_url(settings.database_url)
    assert url.port == bouncer.port != pg_address()[1]
    with session_scope(settings.database_url) as s:
        s.execute(text("SELECT 1"))
        timeout = s.scalar(text("SELECT current_setting('statement_timeout')"))
    pools = {p["database"]: p for p in bouncer.pools()}
    assert pools[url.database]["pool_mode"] == "transaction"
    assert _ms(timeout) == round(get_settings().db_statement_timeout * 1000)
