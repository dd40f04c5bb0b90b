"""The FastAPI application. It never imports worker code, torch or tensorflow."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from psycopg.types.json import set_json_loads

from app.api import errors
from app.api.deps import Auth
from app.api.heap import freeze_startup_heap
from app.api.metrics import make_registry
from app.api.routes import artifacts, fleet, jobs, ops, snapshots
from app.api.streams import StreamHub
from app.queue import Dispatcher
from app.settings import Settings, SettingsError, get_settings

DESCRIPTION = """A job queue for GPU training.

Every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer <token>`. Errors are
JSON `{"error": {"code", "message", ...}}`. An unreachable database is a 503 with
`Retry-After`. Request bodies over the limit are a 413.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Decoding stored specs and results is most of a job list's cost: orjson halves it.
    set_json_loads(orjson.loads)
    hub = StreamHub(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        freeze_startup_heap()  # full collections no longer traverse the imports and the app
        yield
        await hub.close()

    app = FastAPI(title="gpufleet", version="0.2.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.auth = Auth(settings)
    app.state.dispatcher = Dispatcher(settings)
    app.state.registry = make_registry(settings)
    app.state.streams = hub
    errors.install(app)
    app.add_middleware(
        errors.BodyLimit,
        limit=settings.max_body_bytes,
        overrides={
            snapshots.PATH: (settings.snapshot_max_bytes, "GPUFLEET_SNAPSHOT_MAX_BYTES"),
        },
    )
    app.include_router(ops.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(fleet.router)
    if settings.command_jobs:  # snapshots exist for command jobs only
        app.include_router(snapshots.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = _deployment_rules(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _deployment_rules(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """State this deployment's spec policy in the document: ``faults`` exists only with fault
    injection on, ``entrypoint`` only under the allowed module prefixes."""
    job = schema.get("components", {}).get("schemas", {}).get("JobSpec")
    if job is None:
        return schema
    props = job["properties"]
    if not settings.fault_injection:
        props.pop("faults", None)
    if not settings.command_jobs:
        for name in ("command", "env", "snapshot"):
            props.pop(name, None)
        job["anyOf"] = [b for b in job.get("anyOf", []) if "command" not in b.get("required", [])]
    prefixes = settings.entrypoint_prefixes
    if not prefixes:
        props.pop("entrypoint", None)
        branches = job.get("anyOf", [])
        job["anyOf"] = [b for b in branches if "entrypoint" not in b.get("required", [])]
        job["required"] = sorted({*job.get("required", []), "framework"})
        props["framework"] = {"type": "string", "enum": ["torch", "tensorflow"]}
    else:
        allowed = "|".join(re.escape(p.rstrip(".")) for p in prefixes)
        entry = props["entrypoint"]
        for branch in entry.get("anyOf", [entry]):
            if branch.get("type") == "string":
                branch["pattern"] = (
                    rf"^({allowed})(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
                )
    return schema


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_safe_bind(host: str, settings: Settings) -> None:
    """With no tokens configured the API serves one tenant to anyone: loopback only."""
    if not settings.tokens and not settings.admin_tokens.strip() and not _is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host} without GPUFLEET_API_TOKENS: with no tokens the API "
            "serves every caller as tenant 'default', so it listens on loopback only"
        )
