"""A job's artifacts: what it left in its output directory, uploaded at its success (listed and
streamed back from the store; another tenant's job is a 404 like everywhere else)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.api.deps import CallerDep, SettingsDep
from app.api.errors import ApiError, responses
from app.api.routes.jobs import JobIdPath, resolve_job
from app.db import artifacts as artifact_rows
from app.db.session import session_scope
from app.settings import Settings
from app.storage import open_store

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


ArtifactNamePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=artifact_rows.MAX_NAME,
        description="The artifact's name: its path under the job's output directory "
        "('/'-separated). No artifact has a name with '..', an empty part or a control "
        "character: such a name is a 404 before any lookup.",
    ),
]


class ArtifactOut(BaseModel):
    name: str = Field(description="Its path under the job's output directory, '/'-separated.")
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="The sha256 of its bytes, hex.")


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


def _listed(settings: Settings, scope: str | None, job_id: str) -> ArtifactList:
    with session_scope(settings.database_url) as session:
        parsed = resolve_job(session, scope, job_id)
        rows = artifact_rows.list_for(session=session, job_id=parsed)
    return ArtifactList(
        artifacts=[ArtifactOut(name=r.name, size=r.size, sha256=r.sha256) for r in rows]
    )


@router.get(
    "/{job_id}/artifacts",
    operation_id="listArtifacts",
    response_model=ArtifactList,
    responses=responses(400, 401, 403, 404, 422, 503),
)
async def list_artifacts(
    job_id: JobIdPath, settings: SettingsDep, caller: CallerDep
) -> ArtifactList:
    """What the job left in its output directory (and a built-in trainer's model), uploaded
    when it succeeded: names, sizes and sha256. Empty until then."""
    return await anyio.to_thread.run_sync(_listed, settings, caller.scope, job_id)


def _found(
    settings: Settings, scope: str | None, job_id: str, name: str
) -> artifact_rows.StoredArtifact:
    with session_scope(settings.database_url) as session:
        parsed = resolve_job(session, scope, job_id)
        found = artifact_rows.find(session=session, job_id=parsed, name=name)
    if found is None:
        raise ApiError(404, "not_found", f"job {parsed} has no artifact {name!r}")
    return found


@router.get(
    "/{job_id}/artifacts/{name:path}",
    operation_id="getArtifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The artifact's bytes (X-Checksum-Sha256: their sha256).",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        **responses(400, 401, 403, 404, 422, 503),
    },
)
async def get_artifact(
    job_id: JobIdPath, name: ArtifactNamePath, settings: SettingsDep, caller: CallerDep
) -> StreamingResponse:
    """Stream one artifact from the store."""
    if not artifact_rows.valid_name(name):
        raise ApiError(
            404, "not_found", f"no artifact is named {name!r}: a relative path, no '..' part"
        )
    found = await anyio.to_thread.run_sync(_found, settings, caller.scope, job_id, name)
    chunks = open_store(settings).read_chunks(found.storage_key)
    try:
        first = await anyio.to_thread.run_sync(next, chunks, b"")
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"artifact {name!r} is no longer in the store") from None

    def body() -> Iterator[bytes]:
        yield first
        yield from chunks

    filename = quote(name.rsplit("/", 1)[-1])
    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(found.size),
            "X-Checksum-Sha256": found.sha256,
            "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
        },
    )
