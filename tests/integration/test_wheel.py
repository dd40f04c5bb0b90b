"""The built wheel works on its own: installed in a fresh virtualenv, ``gpufleet db upgrade``
migrates a database from any directory (the migrations travel inside the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.migrations import check
from tests.conftest import ROOT, drop_database, new_database, sqlalchemy_url

pytestmark = pytest.mark.slow


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    name = new_database()
    yield sqlalchemy_url(name)
    drop_database(name)


def _run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        [str(a) for a in argv], capture_output=True, text=True, timeout=240, **kwargs
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


def test_the_wheel_migrates_a_database_from_any_directory(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Given a wheel built from a copy of the sources (two test runs may build at once)
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("app", "workers"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source])
    [wheel] = dist.glob("gpufleet-*.whl")
    # And a fresh virtualenv with only that wheel installed (its dependencies are borrowed
    # from this environment, through a path entry that loads none of its .pth files, so the
    # project's editable install stays out)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (site / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GPUFLEET_") and key != "PYTHONPATH"
    }
    located = _run([python, "-c", "import app; print(app.__file__)"], cwd=elsewhere, env=env)
    assert located.stdout.startswith(str(venv)), located.stdout
    # When `gpufleet db upgrade` runs from a directory with nothing of the project in it
    done = _run(
        [venv / "bin" / "gpufleet", "db", "upgrade"],
        cwd=elsewhere,
        env={**env, "GPUFLEET_DATABASE_URL": empty_db_url},
    )
    # Then the database has the declared schema
    assert "database schema is up to date" in done.stdout
    check(empty_db_url)
