from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.embedded import EmbeddedRedis
from tests.conftest import flushed_redis
from tests.e2e.fleet import Fleet

#: Redis database of the end-to-end fleet (in-process tests use another).
E2E_REDIS_DB = 13

#: Short times so that expiry and recovery happen within a test.
E2E_TIMINGS = {
    "GPUFLEET_LEASE_TTL": "3",
    "GPUFLEET_HEARTBEAT_INTERVAL": "0.5",
    "GPUFLEET_REAPER_INTERVAL": "0.5",
    "GPUFLEET_REDISPATCH_AFTER": "3",
    "GPUFLEET_TELEMETRY_INTERVAL": "1",
    # Spare trainers import torch in the background after every job: on the 2 cores these tests
    # get, a fleet of several workers would spend them on imports. `gpufleet up`'s tests keep the
    # default (on), and tests/integration/test_supervisor.py covers the spare itself.
    "GPUFLEET_WARM_SPARE": "0",
}


@pytest.fixture
def broker_url(redis_server: str) -> Iterator[str]:
    yield from flushed_redis(E2E_REDIS_DB)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of this test alone, which it may kill and start again empty."""
    with EmbeddedRedis(tmp_path / "own-redis", durable=False).start() as server:
        yield server


@pytest.fixture
def fleet_env(db_url: str, broker_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of every process of an end-to-end fleet."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GPUFLEET_") and key != "CUDA_VISIBLE_DEVICES"
    }
    env.update(E2E_TIMINGS)
    env.update(
        {
            "GPUFLEET_DATABASE_URL": db_url,
            "GPUFLEET_BROKER_URL": broker_url,
            "GPUFLEET_CHECKPOINT_ROOT": str(tmp_path / "checkpoints"),
            "GPUFLEET_DATA_ROOT": str(tmp_path / "data"),
            "GPUFLEET_STORAGE_ROOT": str(tmp_path / "storage"),
            "GPUFLEET_FAULT_INJECTION": "1",
            "GPUFLEET_ENTRYPOINT_ALLOW": "tests.custom_trainers",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(env=fleet_env, workdir=tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()
