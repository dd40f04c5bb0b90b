"""The FastAPI application. It never imports worker code, torch or tensorflow."""

from __future__ import annotations

import ipaddress

from fastapi import FastAPI

from app.api import errors
from app.api.metrics import make_registry
from app.api.routes import fleet, jobs, ops
from app.queue import Dispatcher
from app.settings import Settings, SettingsError, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="gpufleet",
        version="0.1.0",
        description="A job queue for GPU training.",
    )
    app.state.settings = settings
    app.state.dispatcher = Dispatcher(settings)
    app.state.registry = make_registry(settings)
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(jobs.router)
    app.include_router(fleet.router)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_safe_bind(host: str, settings: Settings) -> None:
    """With no tokens configured the API serves one tenant to anyone: loopback only."""
    if not settings.tokens and not _is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host} without GPUFLEET_API_TOKENS: with no tokens the API "
            "serves every caller as tenant 'default', so it listens on loopback only"
        )
