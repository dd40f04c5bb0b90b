"""The ``gpufleet`` command: run the fleet's processes, and talk to its API.

System commands live here; the user commands (submit, status, list, cancel, logs, devices) are
in ``app.cli_user``. Worker code is imported only by the commands that run it, so the API's
image needs no torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.settings import Settings, SettingsError, get_settings

cli = typer.Typer(help="gpufleet: a job queue for GPU training.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(2) from None


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
    )


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (alembic upgrade head), from any directory."""
    from app.migrations import upgrade

    settings = _settings()
    _logging()
    upgrade(settings.database_url)
    typer.echo("database schema is up to date")


@cli.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP API."""
    import uvicorn

    from app.api.app import create_app, ensure_safe_bind

    settings = _settings()
    try:
        ensure_safe_bind(host, settings)
    except SettingsError as exc:
        typer.echo(f"gpufleet: {exc}", err=True)
        raise typer.Exit(2) from None
    _logging()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@cli.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run one GPU worker: claim a device of this host and run the jobs that fit it."""
    settings = _settings()
    _logging(loglevel)
    from workers.main import NoDevices, NoFrameworks, run_worker

    try:
        code = run_worker(settings, loglevel=loglevel)
    except (NoDevices, NoFrameworks) as exc:
        typer.echo(f"gpufleet worker: {exc}", err=True)
        raise typer.Exit(3) from None
    raise typer.Exit(code)


@cli.command()
def reaper() -> None:
    """Run the reaper: expired leases, lost dispatches, dead devices."""
    settings = _settings()
    _logging()
    from workers.reaper import Reaper

    Reaper(settings).run_forever()


@cli.command()
def probe(
    component: Annotated[str, typer.Argument(help="api, worker or reaper")],
    url: Annotated[str, typer.Option(help="API base URL (for 'api').")] = "http://127.0.0.1:8000",
) -> None:
    """Exit 0 when the component is healthy (container healthchecks)."""
    from app import health

    settings = _settings()
    if component == "api":
        import httpx

        try:
            ok = httpx.get(f"{url}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            ok = False
    elif component == "worker":
        ok = health.is_alive("worker", max_age_s=3 * settings.heartbeat_interval)
    elif component == "reaper":
        ok = health.is_alive("reaper", max_age_s=3 * settings.reaper_interval)
    else:
        typer.echo("component must be api, worker or reaper", err=True)
        raise typer.Exit(2)
    raise typer.Exit(0 if ok else 1)


@cli.command()
def up(
    host: Annotated[str, typer.Option(help="API address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="GPUFLEET_DATA_DIR",
            help="Where the embedded PostgreSQL and Redis keep their data, when "
            "GPUFLEET_DATABASE_URL / GPUFLEET_BROKER_URL are not set (default: the user's "
            "data directory, ~/.local/share/gpufleet on Linux).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the whole fleet on this machine: API, reaper and one worker per GPU.

    Without GPUFLEET_DATABASE_URL / GPUFLEET_BROKER_URL it runs its own PostgreSQL / Redis.
    """
    settings = _settings()
    _logging()
    from app.embedded import EmbeddedError, default_data_dir, start_local_services
    from app.local_fleet import Child, LocalFleet
    from app.migrations import upgrade
    from workers.devices import discover

    try:
        devices = discover(fake_gpus=settings.fake_gpus or None, host=settings.hostname)
    except ValueError as exc:
        typer.echo(f"gpufleet up: {exc}", err=True)
        raise typer.Exit(2) from None
    _ensure_port_free(host, port)
    env = dict(os.environ)
    with contextlib.ExitStack() as services:
        try:
            env.update(
                start_local_services(
                    data_dir or default_data_dir(),
                    database="database_url" not in settings.model_fields_set,
                    broker="broker_url" not in settings.model_fields_set,
                    stack=services,
                )
            )
        except EmbeddedError as exc:
            typer.echo(f"gpufleet up: {exc}", err=True)
            raise typer.Exit(2) from None
        upgrade(env.get("GPUFLEET_DATABASE_URL", settings.database_url))
        no_tokens = not settings.auth_required and not settings.admin_tokens.strip()
        if "command_jobs" not in settings.model_fields_set and no_tokens:
            # No tokens: one local user, on loopback only (``ensure_safe_bind``), runs their code.
            env["GPUFLEET_COMMAND_JOBS"] = "1"
        if not devices:
            typer.echo(
                "gpufleet up: no GPU found and GPUFLEET_FAKE_GPUS is not set; starting the API "
                "and reaper without workers (set GPUFLEET_FAKE_GPUS=A100:80,T4:16 to simulate "
                "devices)",
                err=True,
            )
        exe = [sys.executable, "-m", "app.cli"]
        fleet = LocalFleet(
            [
                Child("api", [*exe, "api", "--host", host, "--port", str(port)], env),
                Child("reaper", [*exe, "reaper"], env),
                *(Child(f"worker-{i}", [*exe, "worker"], env) for i in range(len(devices))),
            ]
        )
        typer.echo(
            f"gpufleet up: API on http://{host}:{port}, reaper, {len(devices)} worker(s); "
            "Ctrl-C stops them"
        )
        code = fleet.run()
    raise typer.Exit(code)


def _ensure_port_free(host: str, port: int) -> None:
    """Refuse at once a port in use, rather than an API that fails and is started again."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        typer.echo(f"gpufleet up: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None


def _register_user_commands() -> None:
    from app.cli_user import register

    register(cli)


_register_user_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
