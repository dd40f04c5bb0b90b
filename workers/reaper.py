"""``gpufleet reaper``: takes back what silent workers and a forgetful broker lost.

Every ``reaper_interval``: expired leases are closed and their jobs requeued (or failed when
their attempts are spent), queued jobs whose wake-up is missing or old are dispatched again
(the outbox), devices whose worker stopped heartbeating are freed, the fleet counters'
deltas are folded in (``app.db.counters``), and the history of jobs ended longer ago than
``GPUFLEET_RETENTION_DAYS`` is deleted (``workers.retention``). Any number of reapers
may run: every pass is bounded and skips rows another reaper has locked.

After losing the database and getting it back, the reaper reaps no lease for one
``lease_ttl``: every lease looks expired after an outage, and workers need that long to renew.
A lease that expired during the outage all the same (its worker stopped itself, or died) is
reaped after that, without spending its job's attempt: the outage was not the job's fault.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app import health
from app.db import counters, gangs, reaping
from app.db.session import session_scope, timed_out
from app.domain.states import JobStatus
from app.queue import Dispatcher
from app.settings import Settings
from workers import retention

log = logging.getLogger(__name__)

#: wake-ups sent again per queue per pass, in units of ``reaper_batch`` (10,000 by default).
REDISPATCH_BATCHES = 100
#: status changes folded into the fleet counters per pass, in units of ``reaper_batch``.
COUNTER_FOLD_FACTOR = 100


@dataclass
class PassReport:
    reaped: list[reaping.Reaped] = field(default_factory=list)
    dispatched: int = 0
    devices_freed: int = 0
    pruned: int = 0  #: ended jobs whose history retention deleted
    quiet: bool = False  #: leases were not reaped (post-outage grace)


class Reaper:
    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.dispatcher = dispatcher or Dispatcher(settings)
        self._db_lost = False
        self._quiet_until = 0.0
        #: database time of the last pass that reached the database.
        self._last_ok_at: datetime | None = None
        #: leases that expired within this window (database clock) died of an outage.
        self._outage: tuple[datetime, datetime] | None = None

    def pass_once(self) -> PassReport:
        report = PassReport()
        try:
            self._reap(report)
        except SQLAlchemyError as exc:
            if timed_out(exc):  # a row or statement held too long: not a lost database
                log.warning("reaper pass cut short, the next one goes on: %s", exc)
                return report
            if not self._db_lost:
                log.error("reaper lost the database: %s", exc)
            self._db_lost = True
            return report
        return report

    def _reap(self, report: PassReport) -> None:
        url, limit = self.settings.database_url, self.settings.reaper_batch
        with session_scope(url) as session:  # raises while the database is down
            now: datetime = session.scalar(text("SELECT now()"))
        ttl = self.settings.lease_ttl
        if self._db_lost:
            self._db_lost = False
            self._quiet_until = time.monotonic() + ttl
            if self._last_ok_at is not None:
                self._outage = (self._last_ok_at, now + timedelta(seconds=ttl))
            log.warning("database is back; reaping no lease for %.0fs so workers can renew", ttl)
        self._last_ok_at = now
        report.quiet = time.monotonic() < self._quiet_until
        if not report.quiet:
            with session_scope(url) as session:
                report.reaped = reaping.reap_expired_leases(
                    session=session,
                    grace=self.settings.reaper_grace,
                    limit=limit,
                    outage=self._outage,
                )
            if self._outage is not None and now > self._outage[1] + timedelta(seconds=ttl):
                self._outage = None
        for r in report.reaped:
            log.warning("job %s: lease of epoch %s expired; now %s", r.job_id, r.epoch, r.status)
            if r.status == JobStatus.QUEUED:
                self.dispatcher.dispatch(job_id=r.job_id, queue=r.queue, priority=r.priority)
        report.dispatched = self._redispatch_lost()
        with session_scope(url) as session:
            freed = reaping.free_dead_devices(session=session, limit=limit)
        for uuid in freed:
            log.warning("device %s: its worker stopped heartbeating; freed", uuid)
        report.devices_freed = len(freed)
        with session_scope(url) as session:
            for uuid in gangs.free_ended_gangs(session=session, limit=limit):
                log.warning("device %s: its gang's lease ended; freed", uuid)
        with session_scope(url) as session:
            unschedulable = reaping.fail_unschedulable(session=session, limit=limit)
        with session_scope(url) as session:
            counters.fold(session=session, limit=limit * COUNTER_FOLD_FACTOR)
        for u in unschedulable:
            log.warning("job %s: unschedulable: %s", u.job_id, u.reason)
        report.pruned = retention.prune(self.settings)

    def _redispatch_lost(self) -> int:
        """Send again the wake-ups the broker no longer holds.

        Per queue, the broker should hold at least one message per due queued job; when it
        holds fewer (Redis lost them, the API died before sending, a retry came due), the
        difference is sent again, oldest dispatch first. Comparing counts instead of re-sending
        every old wake-up keeps a long queue from filling the broker with duplicates. When the
        broker cannot say, every wake-up older than ``redispatch_after`` is sent again.
        """
        url, limit = self.settings.database_url, self.settings.reaper_batch
        with session_scope(url) as session:
            due = reaping.due_per_queue(session=session)
        sent = 0
        for queue, count in due.items():
            pending = self.dispatcher.pending(queue)
            missing = count if pending is None else count - pending
            # Batches of reaper_batch, each its own short transaction, until the broker holds
            # what it should: a big idle fleet after Redis lost everything wakes in one pass.
            missing = min(missing, limit * REDISPATCH_BATCHES)
            while missing > 0:
                with session_scope(url) as session:
                    jobs = reaping.claim_due_dispatches(
                        session=session,
                        redispatch_after=self.settings.redispatch_after,
                        limit=min(missing, limit),
                        queue=queue,
                    )
                for job in jobs:
                    self.dispatcher.dispatch(
                        job_id=job.job_id, queue=job.queue, priority=job.priority
                    )
                sent += len(jobs)
                missing = 0 if len(jobs) < min(missing, limit) else missing - len(jobs)
        return sent

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("reaper running every %.1fs", self.settings.reaper_interval)
        while not stop.is_set():
            started = time.monotonic()
            self.pass_once()
            health.touch("reaper")
            stop.wait(max(0.0, self.settings.reaper_interval - (time.monotonic() - started)))
