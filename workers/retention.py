"""The reaper's retention duty: forget the history of jobs that ended long ago.

Each pass deletes, in batches of ``reaper_batch`` jobs (one short transaction each, at most
``RETENTION_BATCHES`` per pass), the events, logs, leases and non-final checkpoint records of
jobs ended more than ``GPUFLEET_RETENTION_DAYS`` ago (``app.db.retention``), then the files of
those checkpoints (:func:`discard_checkpoint`) and their uploaded copies (:func:`discard_object`).
``GPUFLEET_RETENTION_DAYS=0`` keeps everything.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from app.db.retention import prune_ended
from app.db.session import session_scope
from app.settings import Settings
from app.storage import open_store

log = logging.getLogger(__name__)

#: batches of ``reaper_batch`` jobs pruned per pass at most (2,000 jobs with the defaults: far
#: more than a fleet ends in a pass), so that a pass stays short after retention is lowered.
RETENTION_BATCHES = 20


def discard_checkpoint(settings: Settings, path: str) -> bool:
    """Delete a pruned checkpoint's file (a file, or a directory for TensorFlow). Only paths
    under ``checkpoint_root`` are touched: the path was written by a trainer. True if removed.

    Their uploaded copies in the object store go through :func:`discard_object`."""
    root = settings.checkpoint_root.resolve()
    target = Path(path).resolve()
    if target == root or not target.is_relative_to(root):
        log.warning("retention: not deleting checkpoint %s outside %s", path, root)
        return False
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        return True
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True


def discard_object(settings: Settings, key: str) -> bool:
    """Delete a pruned checkpoint's uploaded copy from the object store. True if done; a
    store error is logged and left (an orphaned object, never a record without one)."""
    try:
        open_store(settings).delete(key)
    except Exception as exc:  # any store error: the duty goes on
        log.warning("retention: could not delete checkpoint object %s (%s)", key, exc)
        return False
    return True


def prune(settings: Settings) -> int:
    """One pass of the duty; returns how many jobs it pruned."""
    if settings.retention_days <= 0:
        return 0
    total = 0
    for _ in range(RETENTION_BATCHES):
        with session_scope(settings.database_url) as session:
            pruned = prune_ended(
                session=session,
                retention_days=settings.retention_days,
                limit=settings.reaper_batch,
            )
        for path in pruned.checkpoints:  # after the commit: a file outlives no record
            discard_checkpoint(settings, path)
        for key in pruned.objects:
            discard_object(settings, key)
        total += len(pruned.jobs)
        if len(pruned.jobs) < settings.reaper_batch:
            break
    if total:
        log.info(
            "retention: pruned the history of %d jobs ended over %g days ago",
            total,
            settings.retention_days,
        )
    return total
