"""Code snapshots: upload a tar.gz once (content-addressed per tenant), name it in jobs."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path as FsPath
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel

from app import snapshots
from app.api.deps import CallerDep, SettingsDep
from app.api.errors import ApiError, responses
from app.settings import Settings
from app.storage import open_store

PATH = "/v1/snapshots"
router = APIRouter(prefix=PATH, tags=["snapshots"])

SnapshotIdPath = Annotated[
    str, Path(pattern=snapshots.SNAPSHOT_ID_PATTERN, description="The snapshot's sha256 (hex).")
]


class SnapshotOut(BaseModel):
    id: str  #: the sha256 of the tar.gz, hex
    size: int  #: bytes


def _tenant(caller: CallerDep) -> str:
    if caller.tenant is None:
        raise ApiError(403, "forbidden", "snapshots belong to a tenant: use a tenant token")
    return caller.tenant


def require_snapshot(settings: Settings, tenant: str, snapshot_id: str) -> None:
    """404 unless ``tenant`` uploaded this snapshot (another tenant's is not found either)."""
    if not open_store(settings).exists(snapshots.key(tenant, snapshot_id)):
        raise ApiError(
            404,
            "not_found",
            f"snapshot {snapshot_id} not found: upload it first (POST /v1/snapshots, or "
            "gpufleet submit --workdir)",
        )


@router.post(
    "",
    operation_id="uploadSnapshot",
    status_code=201,
    response_model=SnapshotOut,
    responses={
        200: {"model": SnapshotOut, "description": "This tenant had uploaded it already."},
        **responses(401, 403, 413, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload(request: Request, caller: CallerDep, settings: SettingsDep) -> Response:
    """Upload a tar.gz of a working directory (at most GPUFLEET_SNAPSHOT_MAX_BYTES). Refused,
    with nothing stored: absolute paths, '..', links out of it, devices."""
    tenant = _tenant(caller)
    limit = settings.snapshot_max_bytes
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="gpufleet-snapshot-") as tmp:
        path = FsPath(tmp) / "snapshot.tar.gz"
        size = 0
        with path.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413,
                        "too_large",
                        f"the snapshot is larger than {limit} bytes (GPUFLEET_SNAPSHOT_MAX_BYTES)",
                    )
                digest.update(chunk)
                out.write(chunk)
        snapshot_id = digest.hexdigest()
        try:
            await anyio.to_thread.run_sync(snapshots.check_archive, path)
        except snapshots.UnsafeArchive as exc:
            raise ApiError(422, "invalid_snapshot", f"snapshot refused: {exc}") from None
        status = await anyio.to_thread.run_sync(_store, settings, tenant, snapshot_id, path)
    body = SnapshotOut(id=snapshot_id, size=size)
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def _store(settings: Settings, tenant: str, snapshot_id: str, path: FsPath) -> int:
    store = open_store(settings)
    key = snapshots.key(tenant, snapshot_id)
    if store.exists(key):
        return 200
    store.put_file(key, path)
    return 201


@router.get(
    "/{snapshot_id}",
    operation_id="getSnapshot",
    response_model=SnapshotOut,
    responses=responses(401, 404, 422, 503),
)
def get_snapshot(
    snapshot_id: SnapshotIdPath, caller: CallerDep, settings: SettingsDep
) -> SnapshotOut:
    """Whether this tenant has the snapshot (the CLI uploads only what is missing)."""
    tenant = _tenant(caller)
    size = open_store(settings).size(snapshots.key(tenant, snapshot_id))
    if size is None:
        require_snapshot(settings, tenant, snapshot_id)
    return SnapshotOut(id=snapshot_id, size=size or 0)
