"""Fixtures shared by every tier: a real Postgres database per test, a real Redis database.

The schema is migrated once into a template database; each test gets a cheap clone of it
(``CREATE DATABASE ... TEMPLATE``). A missing Postgres or Redis is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from alembic import command
from alembic.config import Config

from app.db.devices import DeviceRecord
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("GPUFLEET_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN_DSN = f"host={PG_HOST} port=5432 user=postgres dbname=postgres"
REDIS_URL = os.environ.get("GPUFLEET_TEST_REDIS", "redis://127.0.0.1:6379")
#: Redis database for in-process tests; end-to-end tests take their own.
REDIS_TEST_DB = 14


def sqlalchemy_url(dbname: str) -> str:
    return f"postgresql+psycopg://postgres@{PG_HOST}:5432/{dbname}"


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def migrate(url: str) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"gpufleet_tpl_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}"')
    _admin(f'CREATE DATABASE "{name}"')
    migrate(sqlalchemy_url(name))
    yield name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(template_db: str) -> Iterator[str]:
    """A migrated, empty database of this test's own."""
    name = f"gpufleet_t_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield sqlalchemy_url(name)
    from app.db.session import _factories

    factory = _factories.pop(sqlalchemy_url(name), None)
    if factory is not None:
        factory.kw["bind"].dispose()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flushed_redis(db: int) -> Iterator[str]:
    """A Redis database emptied before and after the test."""
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    yield from flushed_redis(REDIS_TEST_DB)


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        broker_url=redis_url,
        checkpoint_root=tmp_path / "checkpoints",
        data_root=tmp_path / "data",
        lease_ttl=3,
        heartbeat_interval=0.5,
        reaper_interval=0.5,
        redispatch_after=2,
        telemetry_interval=0.5,
        hostname="testhost",
    )


def device_record(
    uuid_: str, *, index: int = 0, gpu_type: str = "A100", gib: float = 80, simulated: bool = True
) -> DeviceRecord:
    """A device row as a worker on host ``h`` would register it."""
    return DeviceRecord(
        uuid=uuid_,
        host="h",
        index=index,
        name=f"{'Simulated' if simulated else 'NVIDIA'} {gpu_type}",
        gpu_type=gpu_type,
        memory_bytes=int(gib * 2**30),
        pci_bus_id=f"sim:{index}",
        simulated=simulated,
    )
