"""The user commands of ``gpufleet``: submit, validate, status, list, cancel, events, logs,
devices, fleet.

Ids may be given as unique prefixes (the server resolves them within your jobs, as git does);
read commands take ``--json``; ``--api-url`` and ``--token`` (or GPUFLEET_API_URL and
GPUFLEET_TOKEN) say where and who.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from itertools import islice
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

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JobId = Annotated[str, typer.Argument(help="A job id, or a unique prefix of one.")]


@dataclass
class _Target:
    api_url: str | None = None
    token: str | None = None


_target = _Target()


def _client() -> Client:
    return Client(_target.api_url, _target.token)


def _fail(exc: Exception) -> typer.Exit:
    errors.print(f"[red]gpufleet:[/red] {exc}", markup=True, highlight=False)
    return typer.Exit(1)


def _json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


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


def _upload_workdir(client: Client, workdir: Path) -> str:
    from app.snapshots import pack

    archive = pack(workdir)
    snapshot, sent = client.upload_snapshot(archive)
    how = "uploaded" if sent else "already uploaded"
    errors.print(
        f"snapshot {snapshot['id'][:12]} of {workdir} ({len(archive)} bytes, {how})",
        markup=False,
        highlight=False,
    )
    return str(snapshot["id"])


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


def _ran_on(lease: dict[str, Any]) -> str:
    gpu = lease.get("gpu_name") or lease.get("gpu_type") or lease.get("device") or "?"
    where = lease.get("host") or "?"
    index = lease.get("gpu_index")
    return f"{gpu} (GPU {index if index is not None else '?'} of {where}, {lease['worker']})"


def _print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key in ("id", "name", "status", "queue", "attempts", "waiting_reason"):
        table.add_row(key, str(job.get(key)))
    if job.get("progress"):
        p = job["progress"]
        table.add_row(
            "progress", f"step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss')}"
        )
    if job.get("lease"):
        table.add_row("lease", f"{job['lease']['worker']} (epoch {job['lease']['epoch']})")
    for n, lease in enumerate(job.get("leases") or [], 1):
        outcome = lease.get("outcome") or "running"
        table.add_row(f"try {n}", f"{_ran_on(lease)}: {outcome}")
    if job.get("result"):
        table.add_row("result", json.dumps(job["result"]))
    if job.get("error"):
        table.add_row("error", f"{job['error']['kind']}: {job['error']['message']}")
    console.print(table)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"gpufleet {version('gpufleet')}")
        except PackageNotFoundError:
            typer.echo("gpufleet (not installed)")
        raise typer.Exit()


def register(cli: typer.Typer) -> None:
    @cli.callback()
    def _options(
        api_url: Annotated[
            str | None,
            typer.Option("--api-url", envvar="GPUFLEET_API_URL", help="The API's base URL."),
        ] = None,
        token: Annotated[
            str | None,
            typer.Option("--token", envvar="GPUFLEET_TOKEN", help="Your API token."),
        ] = None,
        _: Annotated[
            bool,
            typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
        ] = False,
    ) -> None:
        """gpufleet: a job queue for GPU training."""
        _target.api_url, _target.token = api_url, token

    @cli.command()
    def submit(
        file: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
        follow: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
        idempotency_key: Annotated[
            str | None, typer.Option(help="Submit at most once (default: a fresh key).")
        ] = None,
        workdir: Annotated[
            Path | None,
            typer.Option(
                help="Pack this directory (minus .gitignore / .gpufleetignore matches) as the "
                "command's working directory; uploaded once per content.",
                file_okay=False,
                exists=True,
            ),
        ] = None,
    ) -> None:
        """Submit a training job (at most once, even through a dropped connection)."""
        client = _client()
        spec = _load_spec(file)
        try:
            if workdir is not None:
                spec["snapshot"] = _upload_workdir(client, workdir)
            job = client.submit(spec, idempotency_key=idempotency_key)
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
    def validate(
        file: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
        as_json: AsJson = False,
    ) -> None:
        """Check a spec, and say which registered devices could run it."""
        try:
            verdict = _client().validate(_load_spec(file))
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(verdict)
            return
        typer.echo(f"valid: queue {verdict['queue']}")
        for d in verdict["fits"]:
            typer.echo(
                f"  fits {d['type']} {d['memory_gb']:g} GiB, GPU {d['index']} of {d['host']}"
            )
        if verdict.get("waiting_reason"):
            errors.print(f"waiting: {verdict['waiting_reason']}")

    @cli.command()
    def status(job_id: JobId, as_json: AsJson = False) -> None:
        """Show one job, with every try and the GPU and host it ran on."""
        try:
            job = _client().job(job_id)
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(job)
        else:
            _print_job(job)

    @cli.command("list")
    def list_(
        status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
        limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
        all_: Annotated[bool, typer.Option("--all", help="Every job (pages through).")] = False,
        as_json: AsJson = False,
    ) -> None:
        """List your jobs, newest first."""
        client = _client()
        try:
            if all_:
                jobs = list(client.all_jobs(status=status))
            else:
                jobs = list(islice(client.all_jobs(status=status), limit))
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(jobs)
            return
        with_steps = any(job.get("progress") for job in jobs)
        table = Table(box=None)
        table.add_column("id", no_wrap=True, min_width=36)  # full ids: copy-paste must work
        for name in ("name", "status", "tries", *(("step",) if with_steps else ()), "created"):
            table.add_column(name, overflow="fold")
        for job in jobs:
            progress = job.get("progress") or {}
            step = f"{progress.get('step', '')}/{progress.get('total_steps', '')}"
            cells = [job["id"], job["name"], job["status"], str(job["attempts"])]
            if with_steps:
                cells.append(step if progress else "")
            cells.append(job["created_at"][5:16].replace("T", " "))
            table.add_row(*cells)
        console.print(table)

    @cli.command()
    def cancel(job_id: JobId) -> None:
        """Cancel a job (a running one stops at its next step)."""
        try:
            job = _client().cancel(job_id)
        except ClientError as exc:
            raise _fail(exc) from None
        typer.echo(
            f"{job['id']}: {job['status']}" + (" (stopping)" if job["status"] == "running" else "")
        )

    @cli.command()
    def events(
        job_id: JobId,
        follow: Annotated[bool, typer.Option(help="Stream until the job ends.")] = False,
        as_json: AsJson = False,
    ) -> None:
        """The job's history: state changes, leases, checkpoints, retries."""
        client = _client()
        try:
            if follow:
                for e in client.follow_events(job_id):
                    _print_event(e.data, as_json)
            else:
                rows = list(client.events(job_id))
                if as_json:
                    _json(rows)
                    return
                for row in rows:
                    _print_event(row, False)
        except ClientError as exc:
            raise _fail(exc) from None

    @cli.command()
    def logs(
        job_id: JobId,
        follow: Annotated[bool, typer.Option(help="Stream until the job ends.")] = False,
        as_json: AsJson = False,
    ) -> None:
        """Print the trainer's output."""
        client = _client()
        try:
            if follow:
                for chunk in client.follow_logs(job_id):
                    sys.stdout.write(json.dumps({"text": chunk}) + "\n" if as_json else chunk)
                    sys.stdout.flush()
            elif as_json:
                _json({"text": client.logs(job_id)})
            else:
                sys.stdout.write(client.logs(job_id))
        except ClientError as exc:
            raise _fail(exc) from None

    @cli.command()
    def artifacts(
        job_id: JobId,
        download: Annotated[
            Path | None,
            typer.Option(help="Download them into this directory (sha256 checked).", metavar="DIR"),
        ] = None,
        as_json: AsJson = False,
    ) -> None:
        """List what a succeeded job left in its output directory; --download fetches it."""
        client = _client()
        try:
            rows = client.artifacts(job_id)
            if download is not None:
                root = download.resolve()
                for row in rows:
                    dest = (root / row["name"]).resolve()
                    if not dest.is_relative_to(root):
                        raise ClientError(f"refusing artifact name {row['name']!r}")
                    client.download_artifact(job_id, row, dest)
                    row["path"] = str(dest)
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(rows)
            return
        table = Table("name", "size", "sha256", *(["saved to"] if download else []))
        for row in rows:
            extra = [row["path"]] if download else []
            table.add_row(row["name"], str(row["size"]), row["sha256"], *extra)
        console.print(table)

    @cli.command()
    def devices(as_json: AsJson = False) -> None:
        """The fleet's GPUs."""
        try:
            rows = _client().devices()
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(rows)
            return
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
                (d.get("current_job") or "-") + (" (gang)" if d.get("gang") else ""),
                "-" if util is None else f"{util:.0%}",
                "yes" if d["simulated"] else "no",
            )
        console.print(table)

    @cli.command()
    def fleet(as_json: AsJson = False) -> None:
        """Totals: devices busy and idle, jobs by status, queued jobs per queue."""
        try:
            summary = _client().fleet()
        except ClientError as exc:
            raise _fail(exc) from None
        if as_json:
            _json(summary)
            return
        d = summary["devices"]
        typer.echo(f"devices: {d['alive']} alive ({d['busy']} busy, {d['idle']} idle)")
        typer.echo("jobs: " + ", ".join(f"{k} {v}" for k, v in summary["jobs"].items()))
        for queue, n in sorted(summary["queues"].items()):
            typer.echo(f"  {queue}: {n} queued")


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event))
        return
    message = f"  {event['message']}" if event.get("message") else ""
    typer.echo(f"{event['seq']:>5}  {event['at']}  {event['kind']}{message}")
