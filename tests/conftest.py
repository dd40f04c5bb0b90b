"""Fixtures shared by every tier: a real Postgres database per test, a real Redis database.

The suite shares nothing with the machine: on first use it starts a Postgres and a Redis of
its own on free ports (the embedded servers ``gpufleet up`` uses, ``app/embedded.py``) and
stops them at the end, so two runs side by side, or a run beside a fleet, never meet. Set
``GPUFLEET_TEST_PG`` (``host:port``, superuser ``postgres`` without password) or
``GPUFLEET_TEST_REDIS`` (``redis://host:port``) to use servers you started instead: the suite
then creates and drops its own databases on that Postgres, and empties Redis databases 13 and
14 of that Redis (12 and 11 for pytest-xdist's second process, and so on down).

The schema is migrated once into a template database; each test gets a cheap clone of it
(``CREATE DATABASE ... TEMPLATE``). A server that does not start is an error, never a skip.

``GPUFLEET_TEST_PGBOUNCER=1`` puts a PgBouncer in transaction mode (``tests/pgbouncer.py``)
between the suite's Postgres and everything the tests run: every database URL a test, an API,
a worker or a reaper gets goes through it; only the suite's own administration (creating,
migrating the template, dropping databases) talks to Postgres directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.db.devices import DeviceRecord
from app.embedded import EmbeddedPostgres, EmbeddedRedis
from app.migrations import upgrade
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PG_HOST = "127.0.0.1"
#: Redis database for in-process tests; end-to-end tests take their own.
REDIS_TEST_DB = 14


class _PrivateServers:
    """The suite's own Postgres and Redis, started on first use and stopped at the end."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._pg: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        self._pg_address: tuple[str, int] | None = None
        self._redis_url: str | None = None
        self._bouncer: Any = None
        self._app_address: tuple[str, int] | None = None

    def _data_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="gpufleet-tests-"))
        return self._dir

    def pg_address(self) -> tuple[str, int]:
        if self._pg_address is None:
            given = os.environ.get("GPUFLEET_TEST_PG")
            if given:
                host, _, port = given.rpartition(":")
                self._pg_address = (host or PG_HOST, int(port))
            else:
                self._pg = EmbeddedPostgres(self._data_dir() / "postgres", durable=False).start()
                self._pg_address = (self._pg.host, self._pg.port)
        return self._pg_address

    def app_address(self) -> tuple[str, int]:
        """Where the code under test connects: Postgres, or PgBouncer in front of it."""
        if self._app_address is None:
            host, port = self.pg_address()
            if os.environ.get("GPUFLEET_TEST_PGBOUNCER", "0") == "1":
                from tests.pgbouncer import EmbeddedPgBouncer, role_timeouts

                if os.environ.get("GPUFLEET_TEST_PG"):
                    # the timeouts go on the role: never alter a server the suite did not start
                    raise RuntimeError(
                        "GPUFLEET_TEST_PGBOUNCER=1 needs the suite's own PostgreSQL: "
                        "unset GPUFLEET_TEST_PG"
                    )
                role_timeouts(f"host={host} port={port} user=postgres dbname=postgres", Settings())
                self._bouncer = EmbeddedPgBouncer(
                    self._data_dir() / "pgbouncer", pg_host=host, pg_port=port
                ).start()
                self._app_address = (self._bouncer.host, self._bouncer.port)
            else:
                self._app_address = (host, port)
        return self._app_address

    def redis_url(self) -> str:
        if self._redis_url is None:
            given = os.environ.get("GPUFLEET_TEST_REDIS")
            if given:
                self._redis_url = given.rstrip("/")
            else:
                self._redis = EmbeddedRedis(self._data_dir() / "redis", durable=False).start()
                self._redis_url = self._redis.url().rsplit("/", 1)[0]
        return self._redis_url

    def stop(self) -> None:
        for server in (self._bouncer, self._redis, self._pg):
            if server is not None:
                server.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


_servers = _PrivateServers()


def pytest_unconfigure(config: pytest.Config) -> None:
    _servers.stop()


def pg_address() -> tuple[str, int]:
    """(host, port) of the suite's Postgres (started on first call)."""
    return _servers.pg_address()


def app_address() -> tuple[str, int]:
    """(host, port) the code under test connects to: the suite's PgBouncer, or Postgres."""
    return _servers.app_address()


def redis_server_url() -> str:
    """``redis://host:port`` of the suite's Redis, without a database number."""
    return _servers.redis_url()


def __getattr__(name: str) -> object:
    """Names earlier versions of this module had as constants, now known once the servers run
    (``from tests.conftest import PG_ADMIN_DSN`` starts the suite's Postgres)."""
    if name == "PG_PORT":
        return pg_address()[1]
    if name == "PG_ADMIN_DSN":
        host, port = pg_address()
        return f"host={host} port={port} user=postgres dbname=postgres"
    if name == "REDIS_URL":
        return redis_server_url()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sqlalchemy_url(dbname: str) -> str:
    """The URL the code under test uses (through PgBouncer with GPUFLEET_TEST_PGBOUNCER=1)."""
    host, port = _servers.app_address()
    return f"postgresql+psycopg://postgres@{host}:{port}/{dbname}"


def pgbouncer() -> Any:
    """The suite's PgBouncer (``tests.pgbouncer.EmbeddedPgBouncer``), None without one."""
    _servers.app_address()
    return _servers._bouncer


def direct_url(dbname: str) -> str:
    """The URL of the database on Postgres itself, never through PgBouncer."""
    host, port = pg_address()
    return f"postgresql+psycopg://postgres@{host}:{port}/{dbname}"


def with_port(url: str, port: int) -> str:
    """The same database URL through another port (an outage proxy, a closed port)."""
    from sqlalchemy import make_url

    return make_url(url).set(port=port).render_as_string(hide_password=False)


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(__getattr__("PG_ADMIN_DSN"), autocommit=True) as conn:
        conn.execute(sql)


def migrate(url: str) -> None:
    upgrade(url)


@pytest.fixture
def server_data_dir() -> Iterator[Path]:
    """A directory for an embedded server's data, outside pytest's temporary tree: pytest
    resets that tree's root to mode 0700 whenever a session starts, which would lock out the
    user an embedded Postgres runs as under root."""
    path = Path(tempfile.mkdtemp(prefix="gpufleet-server-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_address() -> tuple[str, int]:
    return pg_address()


@pytest.fixture(scope="session")
def template_db(postgres_address: tuple[str, int]) -> Iterator[str]:
    name = f"gpufleet_tpl_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}"')
    _admin(f'CREATE DATABASE "{name}"')
    # Directly: PgBouncer would keep server connections to the template open, and a template
    # must have none for CREATE DATABASE ... TEMPLATE.
    migrate(direct_url(name))
    yield name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_database(template: str | None = None) -> str:
    """Create an empty database of the suite's (a clone of ``template``); returns its name."""
    name = f"gpufleet_t_{uuid.uuid4().hex[:12]}"
    # FILE_COPY: a plain copy of the template's files, quicker than WAL-logging a small one.
    clone = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
    _admin(f'CREATE DATABASE "{name}"{clone}')
    return name


def drop_database(name: str) -> None:
    from app.db.session import _factories

    factory = _factories.pop(sqlalchemy_url(name), None)
    if factory is not None:
        factory.kw["bind"].dispose()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(template_db: str) -> Iterator[str]:
    """A migrated, empty database of this test's own."""
    name = new_database(template_db)
    yield sqlalchemy_url(name)
    drop_database(name)


def _xdist_offset() -> int:
    """Two Redis databases per pytest-xdist process, so processes sharing a given Redis
    (``GPUFLEET_TEST_REDIS``) never empty each other's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 2 * int(worker.removeprefix("gw") or 0)


def flushed_redis(db: int) -> Iterator[str]:
    """A database of the suite's Redis, emptied before and after the test."""
    url = f"{redis_server_url()}/{db - _xdist_offset()}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_server() -> str:
    return redis_server_url()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    yield from flushed_redis(REDIS_TEST_DB)


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        broker_url=redis_url,
        checkpoint_root=tmp_path / "checkpoints",
        data_root=tmp_path / "data",
        storage_root=tmp_path / "storage",
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
