"""The user commands of ``gpufleet``: submit, status, list, cancel, logs, devices."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.client import Client, ClientError

FINAL = ("succeeded", "failed", "cancelled")
POLL_S = 1.0

console = Console()
errors = Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    errors.print(f"[red]gpufleet:[/red] {exc}", markup=True, highlight=False)
    return typer.Exit(1)


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise _fail(ValueError(f"cannot read {path}: {exc}")) from None
    if not isinstance(data, dict):
        raise _fail(
            ValueError(f"{path} must hold a job spec (a mapping), not {type(data).__name__}")
        )
    return data


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    """A progress bar (steps, loss) until the job ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id[:8], total=None, detail="queued")
        while True:
            job = client.job(job_id)
            progress = job.get("progress") or {}
            loss = progress.get("loss")
            detail = job["status"] + (f"  loss {loss:.4g}" if loss is not None else "")
            if job.get("waiting_reason"):
                detail += f"  ({job['waiting_reason']})"
            bar.update(
                task,
                total=progress.get("total_steps"),
                completed=progress.get("step", 0),
                detail=detail,
            )
            if job["status"] in FINAL:
                return job
            time.sleep(POLL_S)


def _print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("id", "name", "status", "queue", "attempts", "waiting_reason"):
        table.add_row(key, str(job.get(key)))
    if job.get("progress"):
        p = job["progress"]
        table.add_row(
            "progress", f"step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss')}"
        )
    if job.get("lease"):
        table.add_row("lease", f"{job['lease']['worker']} (epoch {job['lease']['epoch']})")
    if job.get("result"):
        table.add_row("result", json.dumps(job["result"]))
    if job.get("error"):
        table.add_row("error", f"{job['error']['kind']}: {job['error']['message']}")
    console.print(table)


def register(cli: typer.Typer) -> None:
    @cli.command()
    def submit(
        file: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
        follow: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
        idempotency_key: Annotated[str | None, typer.Option(help="Submit at most once.")] = None,
    ) -> None:
        """Submit a training job."""
        client = Client()
        try:
            job = client.submit(_load_spec(file), idempotency_key=idempotency_key)
            typer.echo(job["id"])
            if job.get("waiting_reason"):
                errors.print(f"waiting: {job['waiting_reason']}")
            if follow:
                job = _follow(client, job["id"])
                _print_job(job)
                if job["status"] != "succeeded":
                    raise typer.Exit(1)
        except ClientError as exc:
            raise _fail(exc) from None

    @cli.command()
    def status(
        job_id: str, as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False
    ) -> None:
        """Show one job."""
        try:
            job = Client().job(job_id)
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            typer.echo(json.dumps(job, indent=2))
        else:
            _print_job(job)

    @cli.command("list")
    def list_(
        status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
        limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
    ) -> None:
        """List your jobs, newest first."""
        try:
            jobs = Client().jobs(status=status, limit=limit)
        except ClientError as exc:
            raise _fail(exc) from None
        table = Table("id", "name", "status", "queue", "attempts", "step", "created")
        for job in jobs:
            progress = job.get("progress") or {}
            step = f"{progress.get('step', '')}/{progress.get('total_steps', '')}"
            table.add_row(
                job["id"],
                job["name"],
                job["status"],
                job["queue"],
                str(job["attempts"]),
                step if progress else "",
                job["created_at"],
            )
        console.print(table)

    @cli.command()
    def cancel(job_id: str) -> None:
        """Cancel a job (a running one stops at its next step)."""
        try:
            job = Client().cancel(job_id)
        except ClientError as exc:
            raise _fail(exc) from None
        typer.echo(
            f"{job['id']}: {job['status']}" + (" (stopping)" if job["status"] == "running" else "")
        )

    @cli.command()
    def logs(
        job_id: str,
        follow: Annotated[bool, typer.Option(help="Stream until the job ends.")] = False,
    ) -> None:
        """Print the trainer's output."""
        client = Client()
        try:
            if follow:
                for chunk in client.follow_logs(job_id):
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            else:
                sys.stdout.write(client.logs(job_id))
        except ClientError as exc:
            raise _fail(exc) from None

    @cli.command()
    def devices() -> None:
        """The fleet's GPUs."""
        try:
            rows = Client().devices()
        except ClientError as exc:
            raise _fail(exc) from None
        table = Table("host", "gpu", "type", "memory", "worker", "job", "util", "simulated")
        for d in rows:
            sample = d.get("sample") or {}
            util = sample.get("utilization")
            table.add_row(
                d["host"],
                str(d["index"]),
                d["type"],
                f"{d['memory_gb']:.1f} GiB",
                d.get("worker") or "-",
                (d.get("current_job") or "-")[:8],
                "-" if util is None else f"{util:.0%}",
                "yes" if d["simulated"] else "no",
            )
        console.print(table)
