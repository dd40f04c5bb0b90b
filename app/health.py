"""Liveness files for container healthchecks (``gpufleet probe worker|reaper``).

A long-running component touches its file every loop; the probe checks its age. Files, not
ports: workers and reapers have no port of their own, and a scaled service must not need one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def alive_file(component: str) -> Path:
    return Path(tempfile.gettempdir()) / f"gpufleet-{component}.alive"


def touch(component: str) -> None:
    alive_file(component).touch()


def is_alive(component: str, *, max_age_s: float) -> bool:
    path = alive_file(component)
    try:
        return time.time() - path.stat().st_mtime <= max_age_s
    except FileNotFoundError:
        return False
