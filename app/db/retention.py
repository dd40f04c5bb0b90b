"""Retention: the history of jobs that ended long ago is deleted; the job row and its summary
stay.

A job ended more than ``GPUFLEET_RETENTION_DAYS`` ago loses its events, log chunks, leases and
every checkpoint record but the newest, in one statement per batch. What the API shows of it
remains: status, times, attempts, result, error, GPU statistics, the last progress (copied from
its last lease onto the job row first) and the final checkpoint. The job row itself is never
deleted: the fleet counters are kept by triggers on it, and its event and log sequences
(``jobs.event_seq``, ``jobs.log_seq``) live there. The caller deletes the files of the
checkpoint records this returns (``workers.retention``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.domain.states import FINAL_STATES


@dataclass
class Pruned:
    jobs: list[uuid.UUID] = field(default_factory=list)
    #: paths of the checkpoint records deleted (non-final ones): their files go too.
    checkpoints: list[str] = field(default_factory=list)
    #: store keys of those checkpoints that were uploaded (``workers.checkpoint_sync``).
    objects: list[str] = field(default_factory=list)


def prune_ended(*, session: Session, retention_days: float, limit: int) -> Pruned:
    """Prune up to ``limit`` jobs that ended more than ``retention_days`` ago, oldest first,
    skipping rows another reaper has locked."""
    ended = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
    rows = session.execute(
        text(
            f"""
            WITH due AS (
                SELECT id FROM jobs
                 WHERE finished_at IS NOT NULL AND pruned_at IS NULL
                   AND finished_at < now() - make_interval(secs => :seconds)
                   AND status IN ({ended})
                 ORDER BY finished_at LIMIT :limit
                   FOR UPDATE SKIP LOCKED),
            kept AS (
                UPDATE jobs j SET pruned_at = now(),
                       progress = coalesce((
                           SELECT l.progress FROM leases l
                            WHERE l.job_id = j.id AND l.progress IS NOT NULL
                            ORDER BY l.epoch DESC LIMIT 1), j.progress)
                  FROM due WHERE j.id = due.id
                RETURNING j.id),
            events AS (DELETE FROM job_events e USING due WHERE e.job_id = due.id),
            logs AS (DELETE FROM job_logs g USING due WHERE g.job_id = due.id),
            leased AS (DELETE FROM leases l USING due WHERE l.job_id = due.id),
            older AS (
                DELETE FROM checkpoints c USING due
                 WHERE c.job_id = due.id AND c.id <> (
                     SELECT n.id FROM checkpoints n WHERE n.job_id = c.job_id
                      ORDER BY n.step DESC, n.id DESC LIMIT 1)
                RETURNING c.path, c.storage_key)
            SELECT 'job' AS what, id::text AS value FROM kept
            UNION ALL SELECT 'checkpoint', path FROM older
            UNION ALL SELECT 'object', storage_key FROM older WHERE storage_key IS NOT NULL
            """
        ),
        {"seconds": retention_days * 86400.0, "limit": limit},
    ).all()
    pruned = Pruned()
    for row in rows:
        if row.what == "job":
            pruned.jobs.append(uuid.UUID(row.value))
        elif row.what == "object":
            pruned.objects.append(row.value)
        else:
            pruned.checkpoints.append(row.value)
    return pruned
