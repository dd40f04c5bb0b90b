"""The schema's Alembic migrations, shipped inside the package so that an installed gpufleet
(``pip install gpufleet && gpufleet db upgrade``) can migrate from any directory.

The repository's ``alembic.ini`` points the ``alembic`` command at this same folder for
developers (``alembic revision --autogenerate``, ``alembic check``).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config

#: the folder holding env.py and versions/.
SCRIPT_LOCATION = Path(str(files(__name__)))


def config(url: str) -> Config:
    """An Alembic configuration for the database at ``url``, without an ini file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (alembic upgrade head)."""
    # Alembic announces each of its plugins at INFO; the migrations it runs are what matter.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    command.upgrade(config(url), revision)


def check(url: str) -> None:
    """Raise unless the migrated schema is the declared one (alembic check)."""
    command.check(config(url))
