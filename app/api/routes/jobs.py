"""Jobs: submit, read, list, cancel, events and logs. Routes translate HTTP <-> domain only.

Handlers that write commit before they answer. Job ids may be given as unique prefixes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.api.deps import CallerDep, DispatcherDep, SessionDep, SettingsDep, known_query_only
from app.api.errors import ApiError, responses
from app.api.routes.snapshots import require_snapshot
from app.api.schemas import (
    DeviceFit,
    EventOut,
    EventPage,
    JobOut,
    JobPage,
    LogChunkOut,
    LogPage,
    Validation,
    job_json,
    job_page_json,
)
from app.api.streams import LOG_PAGE, StreamHub, event_stream, log_stream
from app.db import jobs as job_rows
from app.db.devices import list_devices
from app.db.events import list_events
from app.db.hosts import fitting_per_host
from app.db.logs import LogChunk, read_log_page, read_logs
from app.db.session import autocommit_connection, session_scope
from app.domain.gangs import gang_refusal
from app.domain.routing import RoutingError, describe_types, device_fits
from app.domain.spec import JobSpec, SpecPolicyError, check_policy
from app.domain.states import JobStatus
from app.queue import Dispatcher
from app.settings import Settings

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(known_query_only)])

#: the most characters of log text one JSON page carries.
LOG_PAGE_CHARS = 1_048_576

T = TypeVar("T")

JobIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        description="A job id, or a unique prefix of one of your jobs (at least 4 hex digits).",
    ),
]
SSE = "text/event-stream"


def _checked(spec: JobSpec, settings: Settings) -> str:
    """Deployment policy and routing; returns the queue."""
    try:
        check_policy(
            spec,
            entrypoint_prefixes=settings.entrypoint_prefixes,
            fault_injection=settings.fault_injection,
            command_jobs=settings.command_jobs,
        )
        return spec.queue
    except (SpecPolicyError, RoutingError) as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def _gang_checked(session: Session | Connection, spec: JobSpec) -> None:
    """A job of several GPUs: refused when no host could hold it (or, today, at all)."""
    resources = spec.resources
    if resources.gpu_count == 1:
        return
    refusal = gang_refusal(
        gpu_count=resources.gpu_count,
        fitting_per_host=fitting_per_host(
            session=session, gpu_type=resources.gpu_type, memory_gb=resources.memory_gb
        ),
        wanted=f"gpu_type={describe_types(resources.gpu_type)} memory_gb={resources.memory_gb:g}",
    )
    if refusal:
        raise ApiError(422, "invalid_request", refusal)


def _resolve(session: Session, scope: str | None, raw: str) -> uuid.UUID:
    try:
        return job_rows.resolve_job_id(session=session, tenant=scope, raw=raw)
    except job_rows.JobNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except job_rows.AmbiguousJobId as exc:
        raise ApiError(
            400, "ambiguous_id", str(exc), candidates=[str(c) for c in exc.candidates]
        ) from None


#: a job id or unique prefix in the caller's scope (404 if none, 400 if ambiguous), for the
#: routes about a job that live in modules of their own.
resolve_job = _resolve


#: seconds a replica reuses its read of the device table for ``waiting_reason``.
DEVICE_MAX_AGE_S = 1.0


def _json_bytes(body: bytes, status: int = 200) -> Response:
    """JSON serialized once (FastAPI would validate a returned model again; the declared
    response_model still documents it)."""
    return Response(body, status_code=status, media_type="application/json")


def _job(
    connection: Connection, scope: str | None, job_id: uuid.UUID, status: int = 200
) -> Response:
    """The job as answered, its statement through psycopg's cursor (``app.db.driver``)."""
    try:
        record = job_rows.read_job(
            connection=connection, tenant=scope, job_id=job_id, device_max_age=DEVICE_MAX_AGE_S
        )
    except job_rows.JobNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return _json_bytes(job_json(record), status)


_JOB_LINKS = {
    name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}}
    for name, op in (
        ("GetJob", "getJob"),
        ("CancelJob", "cancelJob"),
        ("JobEvents", "jobEvents"),
        ("JobLogs", "jobLogs"),
    )
}


@router.post(
    "",
    operation_id="submitJob",
    status_code=201,
    response_model=JobOut,
    responses={
        201: {"description": "The job, stored and queued.", "links": _JOB_LINKS},
        200: {
            "model": JobOut,
            "description": "The job an earlier request with this key made.",
            "links": _JOB_LINKS,
        },
        **responses(401, 403, 404, 409, 413, 422, 503),
    },
)
def submit(
    spec: JobSpec,
    settings: SettingsDep,
    caller: CallerDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="The same key and body again return the first job (200).",
        ),
    ] = None,
) -> Response:
    """Submit a training job. It is validated once, here, and stored with its rules' version."""
    if caller.tenant is None:
        raise ApiError(403, "forbidden", "admin tokens do not submit jobs: use a tenant token")
    _checked(spec, settings)
    if spec.snapshot is not None:
        require_snapshot(settings, caller.tenant, spec.snapshot)
    # Autocommit: the job, its event and its counters are one statement, committed when it
    # returns (before the dispatch and the answer), without BEGIN and COMMIT round trips.
    with autocommit_connection(settings.database_url) as connection:
        _gang_checked(connection, spec)
        return _submit(connection, spec, caller.tenant, idempotency_key, dispatcher)


def _submit(
    connection: Connection,
    spec: JobSpec,
    tenant: str,
    idempotency_key: str | None,
    dispatcher: Dispatcher,
) -> Response:
    try:
        submitted = job_rows.insert_job(
            connection=connection,
            tenant=tenant,
            spec=spec,
            idempotency_key=idempotency_key,
            device_max_age=DEVICE_MAX_AGE_S,
        )
    except job_rows.IdempotencyConflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    # Committed by now: dispatch only what is committed (the reaper is the outbox).
    if submitted.record is None:  # an earlier job, from its Idempotency-Key
        return _job(connection, tenant, submitted.job_id, 200)
    dispatcher.dispatch(job_id=submitted.job_id, queue=spec.queue, priority=spec.priority)
    return _json_bytes(job_json(submitted.record), 201)


@router.post(
    "/validate",
    operation_id="validateJob",
    response_model=Validation,
    responses=responses(401, 403, 413, 422, 503),
)
def validate(spec: JobSpec, session: SessionDep, settings: SettingsDep, _: CallerDep) -> Validation:
    """Whether the spec is valid here and which registered devices could run it."""
    queue = _checked(spec, settings)
    _gang_checked(session, spec)
    fits = [
        DeviceFit(
            **{k: d[k] for k in DeviceFit.model_fields if k != "frameworks"},
            frameworks=sorted(d["frameworks"] or {}),
        )
        for d in list_devices(session=session)
        if device_fits(
            device_type=d["type"],
            device_memory_gib=d["memory_gb"],
            job_type=spec.resources.gpu_type,
            job_memory_gb=spec.resources.memory_gb,
        )
    ]
    if not fits:
        reason: str | None = (
            f"no registered device fits gpu_type={describe_types(spec.resources.gpu_type)} "
            f"memory_gb={spec.resources.memory_gb:g}; the job would wait"
        )
    else:
        devices = job_rows.device_sizes(session)
        reason = job_rows.waiting_reason(spec.model_dump(mode="json"), devices)
    return Validation(valid=True, queue=queue, fits=fits, waiting_reason=reason)


#: a job list cursor: the last job's created_at (microseconds since the epoch) and id.
JOB_CURSOR_PATTERN = r"^[0-9]{1,16}_[0-9a-f]{32}$"
#: an event or log cursor: the last sequence number seen.
SEQ_CURSOR_PATTERN = r"^[0-9]{1,18}$"


def _encode_cursor(cursor: tuple[datetime, uuid.UUID] | None) -> str | None:
    if cursor is None:
        return None
    at, job_id = cursor
    micros = (at - EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{job_id.hex}"


def _decode_cursor(raw: str | None) -> tuple[datetime, uuid.UUID] | None:
    if raw is None:
        return None
    micros, _, hexid = raw.partition("_")
    return EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hexid)


def _seq_cursor(raw: str | None) -> int:
    if raw is None:
        return 0
    if not re.fullmatch(SEQ_CURSOR_PATTERN, raw):
        raise ApiError(
            422, "invalid_request", "cursor: not a cursor from a previous page's next_cursor"
        )
    return int(raw)


JobCursorQuery = Annotated[
    str | None,
    Query(pattern=JOB_CURSOR_PATTERN, description="next_cursor of the previous page."),
]
CursorQuery = Annotated[
    str | None,
    Query(
        pattern=SEQ_CURSOR_PATTERN,
        description="next_cursor of the previous page: the last seq seen (0: from the start).",
    ),
]


@router.get(
    "", operation_id="listJobs", response_model=JobPage, responses=responses(401, 403, 422, 503)
)
def list_jobs(
    settings: SettingsDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: JobCursorQuery = None,
    tenant: Annotated[
        str | None, Query(max_length=200, description="Admins: only this tenant's jobs.")
    ] = None,
) -> Response:
    """Your jobs (an admin: every tenant's), newest first; pass ``next_cursor`` back for the
    next page. A page costs the same few queries whatever its size."""
    scope = caller.scope
    if tenant is not None:
        if not caller.admin:
            raise ApiError(403, "forbidden", "only admin tokens choose a tenant")
        scope = tenant
    # Autocommit: the page is one statement (the device table, when read, is a cached view
    # anyway), without BEGIN and ROLLBACK round trips.
    with autocommit_connection(settings.database_url) as connection:
        records, next_cursor = job_rows.read_jobs(
            connection=connection,
            tenant=scope,
            status=status,
            limit=limit,
            cursor=_decode_cursor(cursor),
            device_max_age=DEVICE_MAX_AGE_S,
        )
    return _json_bytes(job_page_json(records, _encode_cursor(next_cursor)))


@router.get(
    "/{job_id}",
    operation_id="getJob",
    response_model=JobOut,
    responses=responses(400, 401, 403, 404, 422, 503),
)
def get_job(job_id: JobIdPath, request: Request, caller: CallerDep) -> Response:
    """One job, with every try and the GPU and host it ran on."""
    # The settings from the app, not through a dependency: the busiest read solves no more
    # dependencies than it must (the caller, and the router's query check).
    settings: Settings = request.app.state.settings
    # Autocommit: the job's one statement (two with a short id, which never changes) without
    # the BEGIN and ROLLBACK round trips around it.
    with autocommit_connection(settings.database_url) as connection:
        try:
            parsed = uuid.UUID(job_id)  # a full id: one statement, scoped to the tenant
        except ValueError:
            with Session(bind=connection) as session:
                parsed = _resolve(session, caller.scope, job_id)
        return _job(connection, caller.scope, parsed)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancelJob",
    status_code=202,
    response_model=JobOut,
    responses=responses(400, 401, 403, 404, 409, 422, 503),
)
def cancel(
    job_id: JobIdPath, session: SessionDep, caller: CallerDep, dispatcher: DispatcherDep
) -> Response:
    """A queued job is cancelled at once; a running one stops at its next step. The cancel is
    committed before the answer, then its worker is woken through Redis."""
    parsed = _resolve(session, caller.scope, job_id)
    try:
        status = job_rows.cancel_job(session=session, tenant=caller.scope, job_id=parsed)
    except job_rows.JobNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except job_rows.JobAlreadyFinished as exc:
        raise ApiError(409, "already_finished", str(exc)) from None
    session.commit()
    if status == JobStatus.RUNNING:
        dispatcher.publish_cancel(parsed)
    return _job(session.connection(), caller.scope, parsed, 202)


async def _in_thread(settings: Settings, work: Callable[[Session], T]) -> T:
    """A short session on a worker thread: a stream handler holds neither while it waits."""

    def run() -> T:
        with session_scope(settings.database_url) as session:
            return work(session)

    return await anyio.to_thread.run_sync(run)


def _hub(request: Request) -> StreamHub:
    hub: StreamHub = request.app.state.streams
    return hub


def _wants_sse(request: Request) -> bool:
    return SSE in request.headers.get("accept", "")


def _last_event_id(request: Request, cursor: str | None) -> int:
    """Where a stream resumes: ``Last-Event-ID`` (a reconnecting EventSource), else cursor."""
    last = request.headers.get("last-event-id")
    return _seq_cursor(last.strip() if last is not None else cursor)


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get(
    "/{job_id}/events",
    operation_id="jobEvents",
    response_model=EventPage,
    responses={
        200: {
            "description": "A page of events; with Accept: text/event-stream, a live stream "
            "(SSE id = seq; resumes from Last-Event-ID; ends with an 'end' event).",
            "content": {SSE: {"schema": {"type": "string"}}},
        },
        **responses(400, 401, 403, 404, 422, 503),
    },
)
async def events(
    job_id: JobIdPath,
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Any:
    """The job's history in order; ``next_cursor`` pages on. With ``Accept:
    text/event-stream``, a live stream until the job ends."""
    after = _last_event_id(request, cursor)

    def page(session: Session) -> tuple[uuid.UUID, EventPage]:
        parsed = _resolve(session, caller.scope, job_id)
        rows = list_events(session=session, job_id=parsed, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = str(rows[-1].seq) if more else None
        return parsed, EventPage(events=[EventOut.of(r) for r in rows], next_cursor=nxt)

    if not _wants_sse(request):
        return (await _in_thread(settings, page))[1]
    parsed = await _in_thread(settings, lambda s: _resolve(s, caller.scope, job_id))
    stream = event_stream(_hub(request), request, parsed, after)
    return StreamingResponse(stream, media_type=SSE, headers=_STREAM_HEADERS)


@router.get(
    "/{job_id}/logs",
    operation_id="jobLogs",
    response_model=LogPage,
    responses={
        200: {
            "description": "A page of the trainer's output; with Accept: text/plain, all of it "
            "as text; with follow=true, a live stream (SSE with Accept: text/event-stream, "
            "else text) until the job ends.",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                SSE: {"schema": {"type": "string"}},
            },
        },
        **responses(400, 401, 403, 404, 422, 503),
    },
)
async def logs(
    job_id: JobIdPath,
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    follow: bool = False,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """The trainer's output, every attempt, in order: JSON pages (at most ``limit`` chunks and
    about 1 MiB of text each), the whole text streamed, or followed live."""
    after = _last_event_id(request, cursor)
    accept = request.headers.get("accept", "")
    parsed = await _in_thread(settings, lambda s: _resolve(s, caller.scope, job_id))
    if follow:
        sse = SSE in accept
        stream = log_stream(_hub(request), request, parsed, after, sse=sse)
        media = SSE if sse else "text/plain; charset=utf-8"
        return StreamingResponse(stream, media_type=media, headers=_STREAM_HEADERS)
    if "text/plain" in accept and "application/json" not in accept:
        return StreamingResponse(
            _whole_log(settings, parsed, after), media_type="text/plain; charset=utf-8"
        )

    def page(session: Session) -> LogPage:
        chunks, more = read_log_page(
            session=session, job_id=parsed, after=after, limit=limit, max_chars=LOG_PAGE_CHARS
        )
        return LogPage(
            logs=[LogChunkOut.of(c) for c in chunks],
            text="".join(c.text for c in chunks),
            next_cursor=str(chunks[-1].seq) if more else None,
        )

    return await _in_thread(settings, page)


async def _whole_log(settings: Settings, job_id: uuid.UUID, after: int) -> AsyncIterator[str]:
    """Every chunk, a page at a time: memory stays one page whatever the log's size."""

    def page(session: Session, cursor: int) -> list[LogChunk]:
        return read_logs(session=session, job_id=job_id, after=cursor, limit=LOG_PAGE)

    while True:
        chunks = await _in_thread(settings, partial(page, cursor=after))
        for c in chunks:
            yield c.text
        if len(chunks) < LOG_PAGE:
            return
        after = chunks[-1].seq
