"""The migrated schema is exactly the declared one (alembic check finds nothing to do)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from tests.conftest import ROOT


def test_alembic_check_after_upgrade(db_url: str) -> None:
    # Given a database migrated to head (the db_url fixture clones a migrated template)
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = db_url
    cfg.attributes["configure_logger"] = False
    # Then autogenerate detects no difference from app.db.models (raises if it does)
    command.check(cfg)
