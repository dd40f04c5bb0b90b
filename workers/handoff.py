"""What a worker's main process and its running job's supervisor share, so that a busy GPU
costs the database one write per heartbeat interval.

The worker's main process keeps the device claim (``workers.claim.DeviceKeeper``) and samples
the GPU (``workers.telemetry``); the job's supervisor runs in a Celery pool child and renews the
lease. While a job runs, the lease's heartbeat also renews the device claim and stores the
latest sample, in the same statement (``app.db.leases.heartbeat``). The two processes meet in a
small directory, named in the worker's identity before Celery forks its pool:

- ``sample.json``: the latest GPU sample, replaced atomically by the telemetry thread and read
  by the supervisor at each heartbeat;
- ``renewed``: touched by the supervisor each time its heartbeat renewed the device claim. While
  it is fresh the keeper writes nothing (it renews its own deadline instead) and the telemetry
  thread knows the device is busy; once the job ends it ages, and the keeper's own heartbeat
  (which stores the sample too) takes over within two intervals;
- ``leased``: touched by the supervisor when it wins a lease (the lease statement renews the
  device claim too), so that the keeper writes nothing until the first heartbeat either and the
  samples taken meanwhile are marked busy.

Files, not pipes or shared memory: either side may die or start at any time, a stale file
says so by its age, and a read costs one stat() or one small read, never a database round trip.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE = "sample.json"
RENEWED = "renewed"
LEASED = "leased"


def prepare(worker: str) -> Path:
    """A fresh hand-off directory for this worker process (stale files removed)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker)
    path = Path(tempfile.gettempdir()) / f"gpufleet-handoff-{safe}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    for name in (SAMPLE, RENEWED, LEASED):
        (path / name).unlink(missing_ok=True)
    return path


class Handoff:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        #: the ``taken_at`` of the last sample this side took (each one is stored once).
        self._taken: float | None = None

    # -- the telemetry thread (main process) ------------------------------------------------

    def put_sample(self, sample: dict[str, Any]) -> None:
        """Publish the latest sample (atomically: a reader never sees half a file)."""
        target = self.directory / SAMPLE
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(sample))
            os.replace(partial, target)
        except OSError as exc:  # a sample is a nicety; the heartbeat goes without it
            log.warning("could not hand the GPU sample over: %s", exc)

    # -- both sides -------------------------------------------------------------------------

    def take_sample(self, *, since: float = 0.0) -> dict[str, Any] | None:
        """The latest sample if it is newer than the one this side took last and was taken
        at ``since`` (a ``time.time()``) or later, else None."""
        try:
            sample = json.loads((self.directory / SAMPLE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(sample, dict):
            return None
        taken_at = sample.get("taken_at")
        if taken_at is not None and (taken_at == self._taken or taken_at < since):
            return None
        self._taken = taken_at
        return sample

    # -- the supervisor (pool child) and the keeper (main process) --------------------------

    def mark_leased(self) -> None:
        """A lease was just won on this device."""
        self._touch(LEASED)

    def mark_renewed(self) -> None:
        """The lease's heartbeat just renewed the device claim."""
        self._touch(RENEWED)

    def renewed_within(self, seconds: float) -> bool:
        """Whether a lease was won or renewed on this device in the last ``seconds``: either
        statement renewed the device claim, and the device is busy."""
        return min(self._age(RENEWED), self._age(LEASED)) <= seconds

    def _touch(self, name: str) -> None:
        try:
            (self.directory / name).touch()
        except OSError as exc:  # the keeper then renews the claim itself: one write more
            log.warning("could not hand %s over: %s", name, exc)

    def _age(self, name: str) -> float:
        try:
            return time.time() - (self.directory / name).stat().st_mtime
        except OSError:
            return float("inf")
