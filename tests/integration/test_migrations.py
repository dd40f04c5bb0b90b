"""The migrated schema is exactly the declared one, whichever way the migrations are run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.migrations import check
from tests.conftest import ROOT, drop_database, new_database, sqlalchemy_url


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A database with no schema at all (not a clone of the migrated template)."""
    name = new_database()
    yield sqlalchemy_url(name)
    drop_database(name)


def test_alembic_check_after_upgrade(db_url: str) -> None:
    # Given a database migrated to head (the db_url fixture clones a migrated template)
    # Then autogenerate detects no difference from app.db.models (raises if it does)
    check(db_url)


def test_the_alembic_command_upgrades_an_empty_database_and_finds_nothing_to_do(
    empty_db_url: str,
) -> None:
    # Given an empty database and the developers' `alembic` command run from the repository
    env = {**os.environ, "GPUFLEET_DATABASE_URL": empty_db_url}
    alembic = [sys.executable, "-m", "alembic"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*alembic, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    # When it upgrades to head
    upgraded = run("upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    # Then `alembic check` finds the schema equal to the models, at the packaged head
    checked = run("check")
    assert checked.returncode == 0, checked.stderr
    current = run("current")
    assert "(head)" in current.stdout, current.stdout + current.stderr


def test_gpufleet_db_upgrade_works_outside_the_repository(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Given an empty database, and a directory with no alembic.ini in it
    env = {**os.environ, "GPUFLEET_DATABASE_URL": empty_db_url}
    # When `gpufleet db upgrade` runs there
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "db", "upgrade"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then the schema is the declared one
    assert done.returncode == 0, done.stderr
    check(empty_db_url)
