"""The version of the code a spare trainer (or the fork server) has imported."""

from __future__ import annotations

from pathlib import Path

#: the code a spare has imported, whose change on disk makes a spare stale.
_CODE_ROOTS = (Path(__file__).parent / "trainers", Path(__file__).parents[1] / "app" / "domain")


def code_version() -> float:
    """The newest modification time of the trainer's code (a few dozen stat calls)."""
    return max((p.stat().st_mtime for root in _CODE_ROOTS for p in root.glob("*.py")), default=0.0)
