"""The ``gpufleet`` command: run the fleet's processes, and talk to its API.

System commands live here; the user commands (submit, status, list, cancel, logs, devices) are
in ``app.cli_user``. Worker code is imported only by the commands that run it, so the API's
image needs no torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from app.settings import Settings, SettingsError, get_settings

cli = typer.Typer(help="gpufleet: a job queue for GPU training.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

ROOT = Path(__file__).resolve().parents[1]


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
    """Apply the schema migrations (alembic upgrade head)."""
    from alembic import command
    from alembic.config import Config

    settings = _settings()
    ini = next((p for p in (ROOT / "alembic.ini", Path.cwd() / "alembic.ini") if p.exists()), None)
    if ini is None:
        typer.echo("gpufleet: alembic.ini not found (run from the project directory)", err=True)
        raise typer.Exit(2)
    cfg = Config(str(ini))
    cfg.attributes["url"] = settings.database_url
    command.upgrade(cfg, "head")
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
) -> None:
    """Run the whole fleet on this machine: API, reaper and one worker per GPU."""
    settings = _settings()
    db_upgrade()
    from workers.devices import discover

    try:
        devices = discover(fake_gpus=settings.fake_gpus or None, host=settings.hostname)
    except ValueError as exc:
        typer.echo(f"gpufleet up: {exc}", err=True)
        raise typer.Exit(2) from None
    if not devices:
        typer.echo(
            "gpufleet up: no GPU found and GPUFLEET_FAKE_GPUS is not set; starting the API and "
            "reaper without workers (set GPUFLEET_FAKE_GPUS=A100:80,T4:16 to simulate devices)",
            err=True,
        )
    exe = [sys.executable, "-m", "app.cli"]
    commands = [
        [*exe, "api", "--host", host, "--port", str(port)],
        [*exe, "reaper"],
        *([*exe, "worker"] for _ in devices),
    ]
    procs = [subprocess.Popen(c, start_new_session=True) for c in commands]
    typer.echo(
        f"gpufleet up: API on http://{host}:{port}, reaper, {len(devices)} worker(s); "
        "Ctrl-C stops them"
    )

    def _stop(*_: object) -> None:
        # The leader only, as `docker stop` does: a worker then hands its job back at a
        # checkpoint (workers/drain.py) before it exits; its children follow it.
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    try:
        while all(p.poll() is None for p in procs[:2]):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # a stuck leader, or what outlived it
    raise typer.Exit(1 if any(p.returncode not in (0, -15, None) for p in procs[:2]) else 0)


def _register_user_commands() -> None:
    from app.cli_user import register

    register(cli)


_register_user_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
