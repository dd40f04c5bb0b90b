"""Every gpufleet connection carries the settings' timeouts and keeps no server-side state that
PgBouncer's transaction mode would hand to another client."""

from __future__ import annotations

from sqlalchemy import text

from app.db.session import engine_for, session_scope
from app.settings import Settings, get_settings


def test_connections_have_the_timeouts_of_the_settings_and_never_prepare(
    settings: Settings,
) -> None:
    configured = get_settings()  # the process's settings (GPUFLEET_* or the defaults)
    with session_scope(settings.database_url) as s:
        statement = s.scalar(text("SELECT current_setting('statement_timeout')"))
        lock = s.scalar(text("SELECT current_setting('lock_timeout')"))
        for _ in range(10):  # more than psycopg's default prepare threshold (5)
            s.execute(text("SELECT 1 WHERE 1 = :one"), {"one": 1})
        prepared = s.scalar(text("SELECT count(*) FROM pg_prepared_statements"))
    ms = {"statement": round(configured.db_statement_timeout * 1000)}
    ms["lock"] = round(configured.db_lock_timeout * 1000)
    assert _ms(statement) == ms["statement"] and ms["statement"] > 0
    assert _ms(lock) == ms["lock"] and ms["lock"] > 0
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
