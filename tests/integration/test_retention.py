"""Retention on a real Postgres, through the reaper's real pass: the history of jobs ended over
``retention_days`` ago goes (events, logs, leases, non-final checkpoints and their files), the
job row and its summary stay, and under a steady stream of short jobs the history tables stop
growing."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from app.db import leases
from app.db.fleet import fleet_summary
from app.db.jobs import get_job, submit_job
from app.db.logs import append_log
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.domain.states import EventKind, LeaseOutcome
from app.settings import Settings
from app.storage import open_store
from workers.reaper import Reaper
from workers.retention import discard_checkpoint

SPEC = JobSpec.model_validate({"framework": "torch"})
HISTORY = ("job_events", "job_logs", "leases", "checkpoints")
#: what one job of ``_run_short_job`` leaves: submitted, leased, 3 x (resumed, checkpoint),
#: succeeded; 3 chunks of output; 1 lease; the last 2 of its 3 checkpoints.
ONE_JOB = {"job_events": 9, "job_logs": 3, "leases": 1, "checkpoints": 2}


class HealthyBroker:
    """Holds every wake-up: the reaper sends none (it is not what these tests look at)."""

    def dispatch(self, *, job_id: uuid.UUID, queue: str, priority: int) -> bool:
        return True

    def pending(self, queue: str) -> int | None:
        return 10**9


def _run_short_job(settings: Settings, *, steps: int = 3, upload: bool = False) -> uuid.UUID:
    """Submit a job and run it through the real lease statements: events, output, progress,
    a checkpoint per step (files under checkpoint_root, two kept; with ``upload``, each also
    put in the store and recorded with its key, as ``workers.checkpoint_sync`` does), success."""
    url = settings.database_url
    with session_scope(url) as s:
        job_id = submit_job(session=s, tenant="t", spec=SPEC).job_id
        grant = leases.acquire_lease(session=s, job_id=job_id, worker="w", device_uuid=None, ttl=60)
    assert grant is not None
    folder = settings.checkpoint_root / str(job_id)
    folder.mkdir(parents=True)
    for step in range(1, steps + 1):
        path = folder / f"step-{step}.pt"
        path.write_bytes(b"weights")
        key = f"checkpoints/{job_id}/{path.name}" if upload else None
        if key is not None:
            open_store(settings).put_file(key, path)
        with session_scope(url) as s:
            leases.heartbeat(
                session=s, job_id=job_id, epoch=grant.epoch, ttl=60, progress={"step": step}
            )
            leases.add_fenced_event(
                session=s, job_id=job_id, epoch=grant.epoch, kind=EventKind.RESUMED, message=""
            )
            append_log(session=s, job_id=job_id, epoch=grant.epoch, chunk=f"step {step}\n")
            stale = leases.record_checkpoint(
                session=s,
                job_id=job_id,
                epoch=grant.epoch,
                step=step,
                path=str(path),
                keep=2,
                storage_key=key,
            )
        for old in stale or []:
            Path(old.path).unlink()
    with session_scope(url) as s:
        assert leases.finish(
            session=s,
            job_id=job_id,
            epoch=grant.epoch,
            outcome=LeaseOutcome.SUCCEEDED,
            result={"loss": 0.1},
        )
    return job_id


def _age(settings: Settings, job_ids: list[uuid.UUID], days: float) -> None:
    with session_scope(settings.database_url) as s:
        s.execute(
            text(
                "UPDATE jobs SET finished_at = now() - make_interval(secs => :secs) "
                "WHERE id = ANY(:ids)"
            ),
            {"secs": days * 86400, "ids": job_ids},
        )


def _rows(settings: Settings, job_id: uuid.UUID | None = None) -> dict[str, int]:
    where = "" if job_id is None else " WHERE job_id = :j"
    with session_scope(settings.database_url) as s:
        return {
            table: s.scalar(text(f"SELECT count(*) FROM {table}{where}"), {"j": job_id})
            for table in HISTORY
        }


def _view(settings: Settings, job_id: uuid.UUID) -> Any:
    with session_scope(settings.database_url) as s:
        return get_job(session=s, tenant=None, job_id=job_id)


def test_an_old_jobs_history_goes_and_its_row_and_summary_stay(
    settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"checkpoint_root": tmp_path, "retention_days": 30})
    # Given two jobs that ran the same way, one ended 31 days ago and one just now
    old, recent = _run_short_job(settings), _run_short_job(settings)
    _age(settings, [old], days=31)
    before = _view(settings, old)
    assert _rows(settings, old) == ONE_JOB
    with session_scope(settings.database_url) as s:
        fleet_before = fleet_summary(session=s)
    # When the reaper passes
    report = Reaper(settings, HealthyBroker()).pass_once()  # type: ignore[arg-type]
    # Then the old job's history is gone but for its final checkpoint, record and file
    assert report.pruned == 1
    assert _rows(settings, old) == {"job_events": 0, "job_logs": 0, "leases": 0, "checkpoints": 1}
    assert sorted(p.name for p in (tmp_path / str(old)).iterdir()) == ["step-3.pt"]
    # And its row and summary stay: status, result, times, attempts, last progress, checkpoint
    after = _view(settings, old)
    assert after is not None and before is not None
    for name in ("status", "result", "created_at", "finished_at", "attempts", "progress"):
        assert getattr(after, name) == getattr(before, name), name
    assert after.progress == {"step": 3}
    assert after.checkpoint is not None and after.checkpoint.step == 3
    # And the fleet's counts do not move (the counters are kept on the job rows)
    with session_scope(settings.database_url) as s:
        assert fleet_summary(session=s) == fleet_before
    # And the recent job keeps everything
    assert _rows(settings, recent) == ONE_JOB
    assert len(list((tmp_path / str(recent)).iterdir())) == 2
    # And a second pass finds nothing more to do
    assert Reaper(settings, HealthyBroker()).pass_once().pruned == 0  # type: ignore[arg-type]
    # And with retention off, nothing is pruned
    _age(settings, [recent], days=400)
    off = settings.model_copy(update={"retention_days": 0})
    assert Reaper(off, HealthyBroker()).pass_once().pruned == 0  # type: ignore[arg-type]


def test_history_tables_stop_growing_under_a_steady_stream_of_short_jobs(
    settings: Settings, tmp_path: Path
) -> None:
    """Each round a few short jobs end and the clock moves a retention period on (the jobs of
    earlier rounds are backdated past it); the reaper's pass prunes in batches of 2. The jobs
    table grows by a round each time, and so do the final checkpoints it keeps (one row per
    job, like the job's own); events, logs and leases hold one round, whatever the round."""
    settings = settings.model_copy(
        update={"checkpoint_root": tmp_path, "retention_days": 30, "reaper_batch": 2}
    )
    reaper = Reaper(settings, HealthyBroker())  # type: ignore[arg-type]
    ended: list[uuid.UUID] = []
    sizes = []
    for _ in range(5):
        _age(settings, ended, days=31)
        latest = [_run_short_job(settings) for _ in range(3)]
        reaper.pass_once()
        ended += latest
        sizes.append(_rows(settings))
    # Then the history holds the latest round only, from the first round on
    history = [{k: v for k, v in size.items() if k != "checkpoints"} for size in sizes]
    assert history == [{k: 3 * ONE_JOB[k] for k in history[0]}] * 5, sizes
    # and the checkpoints the latest round's 2 per job, plus the final one of each older job
    assert [size["checkpoints"] for size in sizes] == [6 + 3 * r for r in range(5)], sizes
    with session_scope(settings.database_url) as s:
        assert s.scalar(text("SELECT count(*) FROM jobs")) == 15
        pruned = s.scalar(text("SELECT count(*) FROM jobs WHERE pruned_at IS NOT NULL"))
    assert pruned == 12
    # And the checkpoint files of pruned jobs are down to the final one each
    files = sorted(p.parent.name for p in tmp_path.glob("*/*.pt"))
    assert len(files) == 12 * 1 + 3 * 2


def test_an_old_jobs_uploaded_checkpoints_leave_the_store_but_the_final_one(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a deployment whose checkpoints go to an object store (a file:// store here; the
    # S3 one answers the same delete, tests/integration/test_storage_s3.py)
    settings = settings.model_copy(
        update={
            "checkpoint_root": tmp_path / "local",
            "storage_url": f"file://{tmp_path / 'bucket'}",
            "retention_days": 30,
        }
    )
    old = _run_short_job(settings, upload=True)
    store = open_store(settings)
    # (step 1's record went at step 3, beyond the 2 kept: its object is checkpoint_sync's)
    keys = [f"checkpoints/{old}/step-{step}.pt" for step in (2, 3)]
    assert all(store.exists(key) for key in keys)
    _age(settings, [old], days=31)
    # When the reaper passes
    assert Reaper(settings, HealthyBroker()).pass_once().pruned == 1  # type: ignore[arg-type]
    # Then the pruned records' objects are gone from the store, the final one stays
    assert [store.exists(key) for key in keys] == [False, True]


def test_a_checkpoint_outside_the_checkpoint_root_is_never_deleted(
    settings: Settings, tmp_path: Path
) -> None:
    root, outside = tmp_path / "checkpoints", tmp_path / "elsewhere.pt"
    root.mkdir()
    outside.write_bytes(b"precious")
    inside = root / "job" / "step-1.pt"
    inside.parent.mkdir()
    inside.write_bytes(b"old")
    configured = settings.model_copy(update={"checkpoint_root": root})
    assert not discard_checkpoint(configured, str(outside))
    assert not discard_checkpoint(configured, str(root / ".." / "elsewhere.pt"))
    assert outside.exists()
    assert discard_checkpoint(configured, str(inside))
    assert not inside.exists()
