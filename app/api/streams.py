"""Live streams of a job's events and logs, with one shared poller per API replica.

A follower holds no thread and no database session while it waits: it awaits an asyncio event
that the replica's poller sets when its job's sequence counters or status move. The poller
reads every followed job's counters in one statement per tick (``jobs.event_seq``,
``jobs.log_seq``, ``jobs.status``); a woken follower reads its new rows in a short session on a
worker thread and lets both go. Polling, not LISTEN/NOTIFY: it needs no dedicated connection
and works unchanged behind PgBouncer in transaction mode.

Rows are read by their per-job, gap-free ``seq`` (given under the job's row lock, so it commits
in order): a cursor never skips a row that commits late. The SSE ``id`` is that ``seq``, so a
client resumes with ``Last-Event-ID``. A stream never ends silently: it ends with an ``end``
event once the job is final and everything was sent, or with a ``reconnect`` event after
``max_s``; a comment every ``keepalive_s`` keeps idle connections open and lets the server
notice a client that went away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request

from app.db import jobs as job_rows
from app.db.events import EventRow, events_in, list_events
from app.db.logs import LogChunk, read_logs
from app.db.session import session_scope
from app.domain.states import JobStatus

log = logging.getLogger(__name__)

POLL_S = 0.25
#: followers of one replica read their rows at most this many at a time, so a burst of events
#: for hundreds of followers never takes the worker threads and pooled connections that
#: requests need (the pool is 10).
FETCH_CONCURRENCY = 3
KEEPALIVE_S = 15.0
MAX_S = 3600.0
PAGE = 500
#: log chunks are up to 64 KiB: a page of them stays a few MiB at most.
LOG_PAGE = 32


#: the most events the poller reads for one job in one tick (followers read the rest).
PUSH_LIMIT = 200

EVENTS, LOGS = "events", "logs"


@dataclass(eq=False)
class _Watch:
    job_id: uuid.UUID
    kind: str  #: EVENTS or LOGS
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: events the poller read for this job, for the follower to send (events only)
    pending: list[EventRow] = field(default_factory=list)


class StreamHub:
    """One per replica: the followed jobs and the poller that wakes their followers."""

    def __init__(self, database_url: str, poll_s: float = POLL_S) -> None:
        self.database_url, self.poll_s = database_url, poll_s
        self._watches: dict[uuid.UUID, set[_Watch]] = {}
        self._seen: dict[uuid.UUID, job_rows.JobCursor] = {}
        self._task: asyncio.Task[None] | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def fetch_limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # made on the event loop that uses it
            self._limiter = anyio.CapacityLimiter(FETCH_CONCURRENCY)
        return self._limiter

    @property
    def followers(self) -> int:
        return sum(len(w) for w in self._watches.values())

    def cursor(self, job_id: uuid.UUID) -> job_rows.JobCursor | None:
        """The job's counters and status as the poller last read them."""
        return self._seen.get(job_id)

    def watch(self, job_id: uuid.UUID, kind: str) -> _Watch:
        w = _Watch(job_id, kind)
        self._watches.setdefault(job_id, set()).add(w)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return w

    def unwatch(self, w: _Watch) -> None:
        watches = self._watches.get(w.job_id)
        if watches is not None:
            watches.discard(w)
            if not watches:
                del self._watches[w.job_id]
                self._seen.pop(w.job_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _read(
        self, known: dict[uuid.UUID, job_rows.JobCursor | None]
    ) -> dict[uuid.UUID, job_rows.JobCursor]:
        with session_scope(self.database_url) as session:
            return job_rows.job_cursors(session=session, known=known)

    def _read_events(
        self, ranges: dict[uuid.UUID, tuple[int, int]]
    ) -> dict[uuid.UUID, list[EventRow]]:
        with session_scope(self.database_url) as session:
            return events_in(session=session, ranges=ranges)

    async def _poll(self) -> None:
        """Each tick: the counters of every followed job that moved, in one statement, then
        the new events of those with event followers in one more; their followers are woken
        with them."""
        while self._watches:
            known = {job_id: self._seen.get(job_id) for job_id in self._watches}
            new: dict[uuid.UUID, list[EventRow]] = {}
            try:
                cursors = await anyio.to_thread.run_sync(self._read, known)
                ranges = {}
                for job_id, cursor in cursors.items():
                    seen = self._seen.get(job_id)
                    followed = any(w.kind == EVENTS for w in self._watches.get(job_id, ()))
                    if seen is not None and followed and cursor.event_seq > seen.event_seq:
                        upto = min(cursor.event_seq, seen.event_seq + PUSH_LIMIT)
                        ranges[job_id] = (seen.event_seq, upto)
                if ranges:
                    new = await anyio.to_thread.run_sync(self._read_events, ranges)
            except SQLAlchemyError as exc:
                log.warning("stream poller: database unreachable: %s", str(exc).splitlines()[0])
                cursors = {}
            for job_id, cursor in cursors.items():
                if self._seen.get(job_id) != cursor:
                    self._seen[job_id] = cursor
                    for w in self._watches.get(job_id, ()):
                        if w.kind == EVENTS:
                            w.pending.extend(new.get(job_id, ()))
                        w.changed.set()
            await asyncio.sleep(self.poll_s)


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {data}\n\n"


@dataclass(frozen=True)
class _Page:
    status: JobStatus | None
    rows: list[Any]


async def _stream(
    *,
    hub: StreamHub,
    request: Request,
    job_id: uuid.UUID,
    kind: str,
    after: int,
    fetch: Callable[[Any, int], list[Any]],
    render: Callable[[Any], str],
    end: Callable[[JobStatus | None, int], str],
    keepalive: str,
    page_size: int = PAGE,
) -> AsyncIterator[str]:
    """Rows come from the poller (events) or from the follower's own short read (its first
    page, logs, or a gap); either way each ``seq`` is sent once, in order."""

    def page(cursor: int) -> _Page:
        with session_scope(hub.database_url) as session:
            # Status first: a final status read here means the rows read next (a later
            # snapshot) hold everything the job will ever write.
            status = job_rows.job_status(session=session, job_id=job_id)
            return _Page(status=status, rows=fetch(session, cursor))

    def counter(c: job_rows.JobCursor) -> int:
        return c.event_seq if kind == EVENTS else c.log_seq

    limiter = hub.fetch_limiter
    watch = hub.watch(job_id, kind)
    deadline = time.monotonic() + MAX_S
    need_read, status = True, None
    try:
        while True:
            watch.changed.clear()
            if need_read:
                got = await anyio.to_thread.run_sync(page, after, limiter=limiter)
                for row in got.rows:
                    if row.seq > after:
                        after = row.seq
                        yield render(row)
                status = got.status
                if len(got.rows) >= page_size:
                    continue
                need_read = False
            pending, watch.pending = watch.pending, []
            for row in pending:
                if row.seq <= after:
                    continue
                if row.seq != after + 1:
                    need_read = True  # a gap: read it ourselves
                    break
                after = row.seq
                yield render(row)
            cursor = hub.cursor(job_id)
            if cursor is not None:
                status = cursor.status
                if counter(cursor) > after:
                    need_read = True
            if need_read:
                continue
            if status is None or status.is_final:
                yield end(status, after)
                return
            if time.monotonic() >= deadline:
                yield _sse("reconnect", json.dumps({"cursor": str(after)}))
                return
            try:
                async with asyncio.timeout(KEEPALIVE_S):  # no task per wait, as wait_for makes
                    await watch.changed.wait()
            except TimeoutError:
                # Idle: see whether the client is still there (an event's own send notices
                # a closed connection, so a woken follower need not ask).
                if await request.is_disconnected():
                    return
                yield keepalive
    finally:
        hub.unwatch(watch)


def _event_json(e: EventRow) -> str:
    return orjson.dumps(
        {
            "seq": e.seq,
            "at": e.at.isoformat(),
            "kind": e.kind,
            "epoch": e.epoch,
            "message": e.message,
            "data": e.data,
        }
    ).decode()


def _end(status: JobStatus | None, after: int) -> str:
    payload = {"status": None if status is None else status.value, "cursor": str(after)}
    return _sse("end", json.dumps(payload))


def event_stream(
    hub: StreamHub, request: Request, job_id: uuid.UUID, after: int
) -> AsyncIterator[str]:
    """SSE: ``id: <seq>``, ``event: <kind>``, ``data: <the event as JSON>``; then ``end``."""
    return _stream(
        hub=hub,
        request=request,
        job_id=job_id,
        kind=EVENTS,
        after=after,
        fetch=lambda s, cursor: list_events(session=s, job_id=job_id, after=cursor, limit=PAGE),
        render=lambda e: _sse(e.kind, _event_json(e), e.seq),
        end=_end,
        keepalive=": keep-alive\n\n",
    )


def log_stream(
    hub: StreamHub, request: Request, job_id: uuid.UUID, after: int, sse: bool
) -> AsyncIterator[str]:
    """The trainer's output: SSE (``event: log``, ``id: <seq>``, data ``{seq, epoch, text}``,
    then ``end``), or plain text when the client did not ask for SSE."""

    def render(c: LogChunk) -> str:
        if not sse:
            return c.text
        payload = {"seq": c.seq, "epoch": c.epoch, "text": c.text}
        return _sse("log", json.dumps(payload), c.seq)

    return _stream(
        hub=hub,
        request=request,
        job_id=job_id,
        kind=LOGS,
        after=after,
        fetch=lambda s, cursor: read_logs(session=s, job_id=job_id, after=cursor, limit=LOG_PAGE),
        render=render,
        end=_end if sse else (lambda status, after: ""),
        keepalive=": keep-alive\n\n" if sse else "",
        page_size=LOG_PAGE,
    )
