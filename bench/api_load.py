"""The API under load against a minimal FastAPI app doing what a submit must, in one run.

    .venv/bin/python bench/api_load.py [--seconds 5] [--concurrency 8 32] [--followers 500]

"baseline": a minimal FastAPI app on the same uvicorn settings: bearer auth, one INSERT
through a pool, one Celery ``send_task`` per submit; a get is one SELECT by id, a list one
SELECT of 50 rows. "gpufleet": the real API (``create_app``) on its own uvicorn process. Both
use a fresh database of their own on the same Postgres and the same Redis.

Part 1: requests/s and p99 of submit, get and list of 50, at each concurrency; targets:
submit and get >= 0.8x the baseline, list >= 0.5x. Beside them, each server's CPU time per
request (from /proc) and their ratio: the same gap, read without the other processes' noise.
Part 2: ``--followers`` SSE followers on the one gpufleet replica, one job each, while a
writer adds events to their jobs and the load generator submits and reads at concurrency 8:
submit/get p99 against the same load without followers (target <= 1.5x), the replica's
database connections (sampled from pg_stat_activity; its pool is 10, shared with the stream
poller), and every follower's events: each once, in order, to the end.

Needs Postgres on 127.0.0.1:5432 (user postgres) and Redis (GPUFLEET_TEST_REDIS or
redis://127.0.0.1:6379); creates and drops its own databases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = "host=127.0.0.1 port=5432 user=postgres"
REDIS = os.environ.get("GPUFLEET_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/") + "/13"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {
    "name": "bench",
    "framework": "torch",
    "model": {"type": "mlp", "input_dim": 32, "hidden_units": [128, 64], "output_dim": 1},
    "resources": {"gpu_type": "any", "memory_gb": 8},
}

# ---------------------------------------------------------------- the baseline app


def baseline_app() -> Any:
    """What a submit must do, and nothing else (uvicorn --factory bench.api_load:baseline_app)."""
    import hmac

    from celery import Celery
    from fastapi import FastAPI, Header, HTTPException
    from sqlalchemy import create_engine, text

    engine = create_engine(os.environ["BASELINE_DATABASE_URL"], pool_size=5, max_overflow=5)
    sender = Celery("baseline")
    sender.conf.update(broker_url=os.environ["BASELINE_BROKER_URL"], task_ignore_result=True)
    app = FastAPI()

    def auth(authorization: str | None) -> None:
        token = (authorization or "").removeprefix("Bearer ")
        if not hmac.compare_digest(token.encode(), TOKEN.encode()):
            raise HTTPException(401)

    @app.post("/v1/jobs", status_code=201)
    def submit(body: dict[str, Any], authorization: str | None = Header(None)) -> dict[str, Any]:
        auth(authorization)
        job_id = uuid.uuid4()
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO jobs (id, tenant, spec) VALUES (:i, 'bench', CAST(:s AS jsonb))"),
                {"i": job_id, "s": json.dumps(body)},
            )
        sender.send_task("gpufleet.run_job", args=[str(job_id)], queue="baseline")
        return {"id": str(job_id), "status": "queued"}

    @app.get("/v1/jobs/{job_id}")
    def get(job_id: uuid.UUID, authorization: str | None = Header(None)) -> dict[str, Any]:
        auth(authorization)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, tenant, spec, created_at FROM jobs WHERE id = :i"), {"i": job_id}
            ).one()
        return {
            "id": str(row.id),
            "tenant": row.tenant,
            "spec": row.spec,
            "created_at": row.created_at.isoformat(),
        }

    @app.get("/v1/jobs")
    def list_(limit: int = 50, authorization: str | None = Header(None)) -> dict[str, Any]:
        auth(authorization)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, tenant, spec, created_at FROM jobs ORDER BY created_at DESC "
                    "LIMIT :n"
                ),
                {"n": limit},
            ).all()
        return {
            "jobs": [
                {
                    "id": str(r.id),
                    "tenant": r.tenant,
                    "spec": r.spec,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]
        }

    return app


# ---------------------------------------------------------------- databases and servers


def admin(sql: str) -> None:
    with psycopg.connect(PG + " dbname=postgres", autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@contextmanager
def database(kind: str) -> Any:
    name = f"gpufleet_bench_{kind}_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        if kind == "gpufleet":
            from alembic import command
            from alembic.config import Config

            cfg = Config(str(ROOT / "alembic.ini"))
            cfg.attributes["url"] = url
            cfg.attributes["configure_logger"] = False
            command.upgrade(cfg, "head")
        else:
            with psycopg.connect(PG + f" dbname={name}", autocommit=True) as conn:
                conn.execute(
                    "CREATE TABLE jobs (id uuid PRIMARY KEY, tenant text, spec jsonb, "
                    "created_at timestamptz DEFAULT now())"
                )
                conn.execute("CREATE INDEX ON jobs (created_at)")
        yield name, url
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(factory: str, env: dict[str, str]) -> Any:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--backlog",
        "4096",
        "--limit-concurrency",
        "4000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{factory} did not start") from None
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ---------------------------------------------------------------- load


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(latencies: list[float]) -> float:
    if len(latencies) < 2:
        return latencies[0] if latencies else float("nan")
    return statistics.quantiles(latencies, n=100)[98]


async def load(
    url: str,
    concurrency: int,
    seconds: float,
    request: Callable[[httpx.AsyncClient], Awaitable[int]],
) -> tuple[float, float, int]:
    """requests/s, p99 seconds, errors."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=60) as http:
        deadline = time.monotonic() + seconds

        async def one() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    status = await request(http)
                except httpx.TransportError:  # counted and shown, not a crash of the bench
                    status = 599
                latencies.append(time.perf_counter() - start)
                if status >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, p99(latencies), errors


def requests_for(ids: list[str]) -> dict[str, Callable[[httpx.AsyncClient], Awaitable[int]]]:
    async def submit(http: httpx.AsyncClient) -> int:
        return (await http.post("/v1/jobs", json=SPEC)).status_code

    async def get(http: httpx.AsyncClient) -> int:
        return (await http.get(f"/v1/jobs/{random.choice(ids)}")).status_code

    async def list50(http: httpx.AsyncClient) -> int:
        return (await http.get("/v1/jobs", params={"limit": 50})).status_code

    return {"submit": submit, "get": get, "list50": list50}


def seed(url: str, n: int) -> list[str]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        return [http.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(n)]


# ---------------------------------------------------------------- part 2: followers


def db_connections(dbname: str) -> int:
    with psycopg.connect(PG + " dbname=postgres", autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name <> 'bench'",
            (dbname,),
        ).fetchone()
        return int(row[0]) if row else 0


def followers_process(
    url: str, db_url: str, jobs: list[str], seconds: float, ready: Any, done: Any
) -> None:
    """In a process of its own (so that parsing 500 streams and writing their events does not
    slow the load generator): follow every job, write events to them, report who got all."""
    os.environ["PGAPPNAME"] = os.environ["GPUFLEET_DB_APPLICATION_NAME"] = "bench"
    from sqlalchemy import text

    from app.db.events import add_event
    from app.db.session import session_scope
    from app.domain.states import EventKind

    job_ids = [uuid.UUID(j) for j in jobs]
    per_job = 4
    received: dict[uuid.UUID, list[int]] = {j: [] for j in job_ids}
    ended: set[uuid.UUID] = set()

    def write() -> None:
        for r in range(per_job):
            for k, job_id in enumerate(job_ids):
                with session_scope(db_url) as s:
                    add_event(session=s, job_id=job_id, kind=EventKind.CHECKPOINT, data={"r": r})
                if k % 50 == 0:
                    time.sleep(seconds / per_job / (len(job_ids) / 50))
        with session_scope(db_url) as s:
            for job_id in job_ids:
                s.execute(text("UPDATE jobs SET status = 'succeeded' WHERE id = :j"), {"j": job_id})
                add_event(session=s, job_id=job_id, kind=EventKind.SUCCEEDED)

    async def run() -> None:
        n = len(job_ids)
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        timeout = httpx.Timeout(180, connect=60)
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, limits=limits, timeout=timeout
        ) as http:
            connected = 0

            async def follow(job_id: uuid.UUID) -> None:
                nonlocal connected
                headers = {"Accept": "text/event-stream"}
                async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("id: "):
                            if not received[job_id]:
                                connected += 1
                            received[job_id].append(int(line[4:]))
                        elif line.startswith("event: "):
                            event = line[7:]
                        elif line == "" and event == "end":
                            ended.add(job_id)
                            return

            tasks = [asyncio.create_task(follow(j)) for j in job_ids]
            while connected < n:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            ready.set()
            writer = threading.Thread(target=write)
            writer.start()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
            writer.join()

    asyncio.run(run())
    expected = list(range(1, per_job + 3))  # submitted, the checkpoints, succeeded
    done.put(sum(1 for j in job_ids if received[j] == expected and j in ended))


async def followers_part(
    url: str, dbname: str, db_url: str, n: int, seconds: float
) -> dict[str, Any]:
    import multiprocessing

    from sqlalchemy import text

    from app.db.jobs import submit_job
    from app.db.session import session_scope
    from app.domain.spec import JobSpec

    spec = JobSpec.model_validate(SPEC)
    with session_scope(db_url) as s:
        jobs = [submit_job(session=s, tenant="bench", spec=spec).job_id for _ in range(n)]
        s.execute(text("UPDATE jobs SET status = 'running' WHERE id = ANY(:j)"), {"j": jobs})
    ids = seed(url, 200)
    reqs = requests_for(ids)
    quiet = {name: await load(url, 8, seconds, reqs[name]) for name in ("submit", "get")}

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    child = ctx.Process(
        target=followers_process,
        args=(url, db_url, [str(j) for j in jobs], seconds, ready, done),
    )
    child.start()
    while not ready.is_set():
        await asyncio.sleep(0.1)
    stop = threading.Event()
    peak = [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], db_connections(dbname))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    busy = {name: await load(url, 8, seconds, reqs[name]) for name in ("submit", "get")}
    complete = await asyncio.to_thread(done.get, True, 240)
    child.join(timeout=30)
    stop.set()
    sampler.join()
    return {
        "quiet": quiet,
        "busy": busy,
        "complete": complete,
        "followers": n,
        "peak_connections": peak[0],
    }


# ---------------------------------------------------------------- main


async def part1(
    servers: dict[str, tuple[str, int]], concurrencies: list[int], seconds: float
) -> dict[Any, Any]:
    """Each op's requests/s, p99 and errors, and the server's CPU milliseconds per request:
    on a shared machine the other processes move requests/s from run to run, a server's own
    CPU per request much less, so the CPU ratio is the steadier reading of the same gap."""
    ids = {name: seed(url, 200) for name, (url, _) in servers.items()}
    results: dict[Any, Any] = {}
    for c in concurrencies:
        for op in ("submit", "get", "list50"):
            for name, (url, pid) in servers.items():  # interleaved: same machine state for both
                before = cpu_seconds(pid)
                rate, tail, errors = await load(url, c, seconds, requests_for(ids[name])[op])
                per_request = (cpu_seconds(pid) - before) / max(1.0, rate * seconds) * 1000
                results[(op, c, name)] = (rate, tail, errors, per_request)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--followers", type=int, default=500)
    parser.add_argument("--skip-part1", action="store_true", help="Only the followers part.")
    args = parser.parse_args()
    # The bench's own connections (setup, the followers' writer) are not the replica's.
    os.environ["PGAPPNAME"] = "bench"
    os.environ["GPUFLEET_DB_APPLICATION_NAME"] = "bench"
    with database("gpufleet") as (gdb, gurl), database("baseline") as (_, burl):
        genv = {
            "GPUFLEET_DATABASE_URL": gurl,
            "GPUFLEET_BROKER_URL": REDIS,
            "GPUFLEET_API_TOKENS": f"bench:{TOKEN}",
            "PGAPPNAME": "gpufleet-api",
            "GPUFLEET_DB_APPLICATION_NAME": "gpufleet-api",
        }
        benv = {"BASELINE_DATABASE_URL": burl, "BASELINE_BROKER_URL": REDIS}
        with (
            server("app.api.app:create_app", genv) as (gapi, gpid),
            server("bench.api_load:baseline_app", benv) as (bapi, bpid),
        ):
            concurrencies = [] if args.skip_part1 else args.concurrency
            results = asyncio.run(
                part1(
                    {"baseline": (bapi, bpid), "gpufleet": (gapi, gpid)},
                    concurrencies,
                    args.seconds,
                )
            )
            targets = {"submit": 0.8, "get": 0.8, "list50": 0.5}
            print(
                f"{'':8} {'c':>3}  {'baseline req/s':>14} {'p99':>8}  "
                f"{'gpufleet req/s':>14} {'p99':>8}  ratio (target)   "
                "server CPU ms/request b / g (ratio)"
            )
            for c in concurrencies:
                for op in ("submit", "get", "list50"):
                    b, g = results[(op, c, "baseline")], results[(op, c, "gpufleet")]
                    errors = f"  errors b={b[2]} g={g[2]}" if b[2] or g[2] else ""
                    print(
                        f"{op:8} {c:>3}  {b[0]:>14.1f} {b[1] * 1000:>6.0f}ms  "
                        f"{g[0]:>14.1f} {g[1] * 1000:>6.0f}ms  "
                        f"{g[0] / b[0]:.2f} (>= {targets[op]})   "
                        f"{b[3]:.2f} / {g[3]:.2f} ({b[3] / g[3]:.2f}){errors}"
                    )
            if args.followers:
                got = asyncio.run(followers_part(gapi, gdb, gurl, args.followers, args.seconds))
                for op in ("submit", "get"):
                    q, b = got["quiet"][op], got["busy"][op]
                    print(
                        f"{op:8} p99 without followers {q[1] * 1000:.0f}ms, with "
                        f"{got['followers']} followers {b[1] * 1000:.0f}ms: "
                        f"{b[1] / q[1]:.2f}x (target <= 1.5)"
                    )
                print(
                    f"followers with every event once, in order, to the end: "
                    f"{got['complete']}/{got['followers']}"
                )
                print(
                    f"peak database connections of the replica: {got['peak_connections']} "
                    f"(its pool: 10)"
                )


if __name__ == "__main__":
    main()
