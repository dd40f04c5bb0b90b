"""A private fleet for the benches: an embedded PostgreSQL and Redis, migrated, and the
process fleet the end-to-end tests use (``tests/e2e/fleet.py``), stopped on exit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.embedded import EmbeddedPostgres, EmbeddedRedis
from app.migrations import upgrade
from tests.e2e.fleet import Fleet


@contextmanager
def private_fleet(tmp: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Fleet, str]]:
    """(fleet, database URL): nothing started yet but the servers; ``env`` adds settings."""
    with (
        EmbeddedPostgres(tmp / "pg", durable=False).start() as pg,
        EmbeddedRedis(tmp / "redis", durable=False).start() as broker,
    ):
        db_url = pg.ensure_database()
        upgrade(db_url)
        base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        base.update(
            {
                "GPUFLEET_DATABASE_URL": db_url,
                "GPUFLEET_BROKER_URL": broker.url(),
                "GPUFLEET_CHECKPOINT_ROOT": str(tmp / "checkpoints"),
                "GPUFLEET_DATA_ROOT": str(tmp / "data"),
                "GPUFLEET_ENTRYPOINT_ALLOW": "tests.custom_trainers",
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
        )
        fleet = Fleet(env=base, workdir=tmp)
        try:
            yield fleet, db_url
        finally:
            fleet.stop()
