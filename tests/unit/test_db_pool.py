"""Worker processes get a small pool through settings; the API keeps its default."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.pool import NullPool, QueuePool

from app.db.session import engine_for
from app.settings import get_settings
from workers.main import use_worker_pool


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[os._Environ[str]]:
    for name in (
        "GPUFLEET_DB_POOL_SIZE",
        "GPUFLEET_DB_MAX_OVERFLOW",
        "GPUFLEET_DB_APPLICATION_NAME",
    ):
        monkeypatch.delenv(name, raising=False)  # undone after the test, set or not
    get_settings.cache_clear()
    yield os.environ
    get_settings.cache_clear()


def test_api_default_pool(env: os._Environ[str], tmp_path: Path) -> None:
    pool = engine_for(f"sqlite:///{tmp_path}/api.db").pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow) == (10, 0)


def test_worker_pool_is_one_plus_small_overflow(env: os._Environ[str], tmp_path: Path) -> None:
    use_worker_pool()
    assert env["GPUFLEET_DB_APPLICATION_NAME"] == "gpufleet-worker"
    pool = engine_for(f"sqlite:///{tmp_path}/worker.db").pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow) == (1, 2)


def test_operator_value_wins_and_zero_means_no_pool(env: os._Environ[str], tmp_path: Path) -> None:
    env["GPUFLEET_DB_POOL_SIZE"] = "0"  # the fixture's delenv restores it
    use_worker_pool()
    assert isinstance(engine_for(f"sqlite:///{tmp_path}/null.db").pool, NullPool)
