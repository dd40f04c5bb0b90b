"""A simulated fleet on one Postgres: what each running GPU costs the database, and how the
fleet's statements grow from a small to a large history.

    .venv/bin/python bench/fleet_scale.py [--workers 1000] [--queued 1000 100000]
                                          [--seconds 30] [--processes 4] [--threads 8]
                                          [--pgbouncer] [--pg HOST:PORT]

N simulated workers run the *real* ``app.db`` statements at the settings' intervals: claim
(``acquire_lease`` of the next queued job, as if the broker had delivered it), the lease
heartbeat every ``heartbeat_interval`` through the real ``LeaseWriter``, the device keeper's
turn every ``heartbeat_interval`` and a GPU sample every ``telemetry_interval``, progress every
``--progress-every`` seconds, a checkpoint every ``--checkpoint-every``, and ``finish`` after
``--job-seconds``. Each simulated worker has its own real hand-off directory
(``workers.handoff``): the sample and the device claim ride on the lease heartbeat while a job
runs, and the keeper writes (claim and sample, one statement) only while its device idles.
``--unfolded`` drives the earlier path instead, for comparison: the keeper renews the claim and
reads the suspicion, and each sample reads the device's job and stores itself (each pair in one
transaction here, in two before: the unfolded count is a floor).

The simulated workers are spread over ``--processes`` forked processes (a 2-core machine cannot
run 1,000 worker processes, and one Python process's threads could not keep 1,000 workers'
intervals). In each, a scheduler hands each due write to a pool of ``--threads`` threads that
share the process's connection pool, one write at a time per simulated worker (as its
supervisor's single loop does). A real worker process holds at most one connection; here
``--processes`` x ``--threads`` connections carry all the simulated workers, fewer than one
per worker, so the fleet's *statements and transactions* are the real ones and its connection
count is a lower bound that ``--pgbouncer`` replaces with PgBouncer's. A write that starts late
shows as *lag*; the report says whether the simulator kept up (heartbeat lag p99 within a
quarter interval and no backlog at the end) and flags a size where it did not.
``--pgbouncer`` puts the fleet, reaper and API behind a PgBouncer in transaction mode
(``tests/pgbouncer.py``'s starter, ``scripts/get-pgbouncer``'s binary) whose pool holds one
server connection per 50 workers.
A reaper (the real ``Reaper``, with a broker that holds every wake-up) passes every
``reaper_interval``, and an API thread reads get / list of 50 / fleet / metrics in turn.

For each size in ``--queued`` the database holds that many queued jobs and as many ended jobs
with full histories (two leases, six events, two log chunks, a checkpoint); each phase runs
``--seconds`` of steady state. It prints Postgres transactions/s and connections, p50/p99 per
statement kind, the reaper's pass, the API's p50/p99, the growth of each figure from the first
size to the last, and the issue's targets beside their figures. Without ``--pg`` it starts a
throwaway Postgres of its own (``app.embedded``). Timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import inspect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from app.api.metrics import FleetCollector  # noqa: E402
from app.db import counters, leases  # noqa: E402
from app.db import devices as device_rows  # noqa: E402
from app.db import jobs as job_rows  # noqa: E402
from app.db.fleet import fleet_summary  # noqa: E402
from app.db.session import dispose_engines, engine_for, session_scope  # noqa: E402
from app.domain.spec import JobSpec  # noqa: E402
from app.domain.states import JobStatus, LeaseOutcome  # noqa: E402
from app.settings import Settings  # noqa: E402
from workers.handoff import Handoff  # noqa: E402
from workers.lease_writer import LeaseWriter  # noqa: E402
from workers.reaper import Reaper  # noqa: E402

TENANT = "bench"
QUEUE = "default"
SPEC = {
    "name": "bench",
    "framework": "torch",
    "model": {"type": "mlp", "input_dim": 32, "hidden_units": [128, 64], "output_dim": 1},
    "resources": {"gpu_type": "any", "memory_gb": 8},
}


#: what the simulated workers do without a transaction (progress and the sample wait for the
#: heartbeat; the keeper skips its turn while the lease heartbeat renewed the claim).
IN_MEMORY = {"progress", "telemetry", "keeper (lease renewed it)"}
#: a job's start and end: one each per job, not per running job and interval (unfolded, the
#: end marks the device idle in a second transaction).
CHURN = {"claim", "finish"}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- the database


def start_postgres(args: argparse.Namespace) -> tuple[str, Any]:
    if args.pg:
        return args.pg, None
    from app.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="fleet-scale-")), durable=False)
    server.max_connections = 300
    server.start()
    return f"{server.host}:{server.port}", server


def admin_dsn(address: str, dbname: str = "postgres") -> str:
    host, _, port = address.rpartition(":")
    return f"host={host} port={port} user=postgres dbname={dbname}"


def create_database(address: str) -> tuple[str, str]:
    from app.migrations import upgrade

    name = f"fleet_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn(address), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    host, _, port = address.rpartition(":")
    url = f"postgresql+psycopg://postgres@{host}:{port}/{name}"
    upgrade(url)
    return name, url


def drop_database(address: str, name: str) -> None:
    """Drop a database this bench created (on a shared Postgres given with ``--pg``, nothing
    of the run is left behind; its own Postgres goes away whole)."""
    with psycopg.connect(admin_dsn(address), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def seed(url: str, dsn: str, *, queued: int, ended: int) -> None:
    """Add ``queued`` queued jobs and ``ended`` ended ones with histories, by copying one
    real submitted job (its spec as the API stores it) in bulk."""
    spec = JobSpec.model_validate(SPEC)
    with session_scope(url) as session:
        template = job_rows.submit_job(session=session, tenant=TENANT, spec=spec).job_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            CREATE TEMP TABLE new_jobs AS
            SELECT gen_random_uuid() AS id, g AS n FROM generate_series(1, %(n)s) g;
            """,
            {"n": queued + ended},
        )
        conn.execute(
            """
            INSERT INTO jobs (id, tenant, name, status, spec, spec_version, queue, priority,
                              spec_hash, max_attempts, dispatched_at, event_seq, log_seq,
                              created_at, started_at, finished_at, attempts, epoch, progress)
            SELECT nj.id, t.tenant || (nj.n %% 20), t.name,
                   CASE WHEN nj.n <= %(q)s THEN 'queued'::job_status
                        ELSE 'succeeded'::job_status END,
                   t.spec, t.spec_version, t.queue, (nj.n %% 3)::smallint, t.spec_hash,
                   t.max_attempts, now(), CASE WHEN nj.n <= %(q)s THEN 1 ELSE 6 END,
                   CASE WHEN nj.n <= %(q)s THEN 0 ELSE 2 END,
                   now() - make_interval(secs => nj.n),
                   CASE WHEN nj.n > %(q)s THEN now() - make_interval(secs => nj.n) END,
                   CASE WHEN nj.n > %(q)s THEN now() - make_interval(secs => nj.n - 60) END,
                   CASE WHEN nj.n <= %(q)s THEN 0 ELSE 2 END,
                   CASE WHEN nj.n <= %(q)s THEN 0 ELSE 2 END,
                   CASE WHEN nj.n > %(q)s THEN '{"step": 100, "loss": 0.1}'::jsonb END
              FROM new_jobs nj, jobs t WHERE t.id = %(t)s
            """,
            {"q": queued, "t": template},
        )
        for statement in (
            """
            INSERT INTO job_events (job_id, seq, kind, epoch, message, at)
            SELECT nj.id, s.seq, s.kind, s.epoch, s.message, now() - make_interval(secs => nj.n)
              FROM new_jobs nj CROSS JOIN (VALUES
                (1, 'submitted', NULL, ''), (2, 'leased', 1, 'attempt 1 on w'),
                (3, 'lease_expired', 1, 'lease of epoch 1 expired'),
                (4, 'leased', 2, 'attempt 2 on w'), (5, 'checkpoint', 2, 'step 100'),
                (6, 'succeeded', 2, '')) AS s(seq, kind, epoch, message)
             WHERE nj.n > %(q)s OR s.seq = 1
            """,
            """
            INSERT INTO leases (job_id, epoch, worker, device_uuid, acquired_at, heartbeat_at,
                                expires_at, released_at, outcome)
            SELECT nj.id, e, 'w', 'dev', now(), now(), now(), now(),
                   CASE WHEN e = 1 THEN 'expired'::lease_outcome
                        ELSE 'succeeded'::lease_outcome END
              FROM new_jobs nj CROSS JOIN generate_series(1, 2) e WHERE nj.n > %(q)s
            """,
            """
            INSERT INTO job_logs (job_id, epoch, seq, chunk)
            SELECT nj.id, e, e, repeat('step 100 loss 0.1\n', 20)
              FROM new_jobs nj CROSS JOIN generate_series(1, 2) e WHERE nj.n > %(q)s
            """,
            """
            INSERT INTO checkpoints (job_id, epoch, step, path)
            SELECT nj.id, 2, 100, '/ckpt/' || nj.id || '/step-100.pt'
              FROM new_jobs nj WHERE nj.n > %(q)s
            """,
        ):
            conn.execute(statement, {"q": queued} if "%(q)s" in statement else None)
    fold_all(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def fold_all(url: str) -> None:
    """Fold the bulk insert's counter deltas, as the reaper would have over its passes (a
    database that has been running holds only the latest pass's deltas)."""
    if "fleet_counters" not in inspect(engine_for(url)).get_table_names():
        return  # before the fleet counters
    while True:
        with session_scope(url) as session:
            if not counters.fold(session=session, limit=20_000):
                return


# ---------------------------------------------------------------- the simulated fleet


@dataclass
class Stats:
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lag: list[float] = field(default_factory=list)
    heartbeat_lag: list[float] = field(default_factory=list)
    checkpoints: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency[kind].append(seconds)


@dataclass
class SimWorker:
    index: int
    name: str
    device: str
    job: uuid.UUID | None = None
    #: the supervisor's writer for the running job (the real one: what it batches, we do).
    writer: LeaseWriter | None = None
    #: bumped per job: a job's scheduled writes carry it, and die with the job.
    generation: int = 0
    #: one write at a time per worker, as its supervisor's single loop does.
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    step: int = 0
    #: the worker's hand-off directory (its keeper's, telemetry's and supervisor's views).
    handoff: Handoff | None = None
    keeper_view: Handoff | None = None
    #: the kind the last action recorded itself as, when not the scheduled one.
    label: str | None = None


class Fleet:
    """Schedules every simulated worker's writes and runs them on a thread pool."""

    def __init__(
        self,
        settings: Settings,
        args: argparse.Namespace,
        queued: deque[uuid.UUID],
        *,
        first: int = 0,
        count: int | None = None,
    ):
        self.s = settings
        self.args = args
        self.queued = queued
        self.stats = Stats()
        shared = Path(tempfile.mkdtemp(prefix="fleet-scale-handoff-"))
        self.workers = [
            SimWorker(index=i, name=f"sim-{first + i}@bench", device=f"GPU-sim-{first + i:05d}")
            for i in range(args.workers if count is None else count)
        ]
        for w in self.workers:
            (shared / str(w.index)).mkdir()
            w.handoff = Handoff(shared / str(w.index))
            w.keeper_view = Handoff(shared / str(w.index))
        self.heap: list[tuple[float, int, str]] = []
        self.heap_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(args.threads)
        self.stop = threading.Event()

    def register(self) -> None:
        records = [
            device_rows.DeviceRecord(
                uuid=w.device,
                host=f"host-{i // 8}",
                index=i % 8,
                name="Simulated A100",
                gpu_type="A100",
                memory_bytes=80 * 2**30,
                pci_bus_id=f"sim:{i}",
                simulated=True,
            )
            for i, w in ((int(w.device.rsplit("-", 1)[1]), w) for w in self.workers)
        ]
        with session_scope(self.s.database_url) as session:
            device_rows.register_devices(session=session, devices=records)
            for w in self.workers:
                device_rows.claim_device(
                    session=session, uuids=[w.device], worker=w.name, ttl=self.s.lease_ttl
                )
        now = time.monotonic()
        spread = self.s.heartbeat_interval
        for i in range(len(self.workers)):
            offset = spread * i / len(self.workers)
            self.schedule(now + offset, i, "claim")
            self.schedule(now + offset, i, "device_heartbeat")
            self.schedule(now + offset, i, "telemetry")

    def schedule(self, at: float, index: int, kind: str) -> None:
        with self.heap_lock:
            heapq.heappush(self.heap, (at, index, kind))

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with self.heap_lock:
                due = self.heap[0][0] if self.heap else end
                if due <= time.monotonic():
                    at, index, kind = heapq.heappop(self.heap)
                else:
                    at = -1.0
            if at < 0:
                time.sleep(min(0.005, max(0.0, due - time.monotonic())))
                continue
            self.pool.submit(self.act, index, kind, at)

    def act(self, index: int, tagged: str, due: float) -> None:
        w, s = self.workers[index], self.s
        kind, _, generation = tagged.partition("@")
        with w.lock:
            if generation and int(generation) != w.generation:
                return  # a write of the worker's previous job
            # how late the write starts: behind the scheduler, the pool's queue or the worker's
            # previous write (a simulator that cannot keep up shows here, not as fewer writes)
            late = time.monotonic() - due
            self.stats.lag.append(late)
            if kind == "heartbeat":
                self.stats.heartbeat_lag.append(late)
            self._timed(w, kind, tagged, s)

    def _timed(self, w: SimWorker, kind: str, tagged: str, s: Settings) -> None:
        index, now = w.index, time.monotonic()
        started = time.perf_counter()
        w.label = None
        try:
            next_at = self._act(w, kind, now)
        except Exception as exc:  # a bench keeps going; the count shows it
            print(f"{kind} failed: {exc!r}", file=sys.stderr)
            self.stats.add("error", 0.0)
            next_at = now + s.heartbeat_interval
        else:
            self.stats.add(w.label or kind, time.perf_counter() - started)
        if next_at is not None:
            self.schedule(next_at, index, tagged)

    def _act(self, w: SimWorker, kind: str, now: float) -> float | None:
        s, a, url = self.s, self.args, self.s.database_url
        with session_scope(url) as session:
            if kind == "claim":
                while self.queued:
                    job = self.queued.popleft()
                    grant = leases.acquire_lease(
                        session=session,
                        job_id=job,
                        worker=w.name,
                        device_uuid=w.device,
                        ttl=s.lease_ttl,
                    )
                    if grant is not None:  # (the lease statement marked the device busy)
                        w.job, w.started, w.step = job, now, 0
                        w.generation += 1
                        w.writer = LeaseWriter(
                            url,
                            job,
                            grant.epoch,
                            ttl=s.lease_ttl,
                            handoff=None if a.unfolded else w.handoff,
                        )
                        for k, every in (
                            ("heartbeat", s.heartbeat_interval),
                            ("progress", a.progress_every),
                            ("checkpoint", a.checkpoint_every),
                        ):
                            self.schedule(now + every, w.index, f"{k}@{w.generation}")
                        self.schedule(now + a.job_seconds, w.index, f"finish@{w.generation}")
                        return None
                return now + s.heartbeat_interval
            if kind == "device_heartbeat" and a.unfolded:
                device_rows.heartbeat_device(
                    session=session, uuid=w.device, worker=w.name, ttl=s.lease_ttl
                )
                device_rows.suspicion(session=session, uuid=w.device)
                return now + s.heartbeat_interval
            if kind == "telemetry" and a.unfolded:
                device_rows.current_job(session=session, uuid=w.device)
                device_rows.record_sample(
                    session=session, uuid=w.device, worker=w.name, sample=self.sample()
                )
                return now + s.telemetry_interval
        if kind == "device_heartbeat":  # as ``DeviceKeeper``: only while no lease renews it
            keeper = w.keeper_view
            assert keeper is not None
            if keeper.renewed_within(1.5 * s.heartbeat_interval):
                w.label = "keeper (lease renewed it)"
                return now + s.heartbeat_interval
            with session_scope(url) as session:
                device_rows.renew_claim(
                    session=session,
                    uuid=w.device,
                    worker=w.name,
                    ttl=s.lease_ttl,
                    sample=keeper.take_sample(),
                )
            return now + s.heartbeat_interval
        if kind == "telemetry":  # as ``TelemetryLoop``: sample, hand over, no write
            assert w.handoff is not None
            w.handoff.put_sample(self.sample())
            return now + s.telemetry_interval
        if w.job is None or w.writer is None:
            return None
        writer = w.writer
        if kind == "heartbeat":
            writer.heartbeat()
            return now + s.heartbeat_interval
        if kind == "progress":
            w.step += 10
            writer.progress({"step": w.step, "epoch": 1, "loss": 0.5, "samples_per_s": 900.0})
            return now + a.progress_every
        if kind == "checkpoint":
            writer.checkpoint(step=w.step, path=f"/ckpt/{w.job}/step-{w.step}.pt", keep=2)
            with self.stats.lock:
                self.stats.checkpoints += 1
            return now + a.checkpoint_every
        if kind == "finish":
            # (the end statement marks the device idle; unfolded, a statement of its own)
            writer.finish(LeaseOutcome.SUCCEEDED, result={"loss": 0.1}, budget=5)
            if a.unfolded:
                with session_scope(url) as session:
                    device_rows.set_current_job(
                        session=session, uuid=w.device, worker=w.name, job_id=None
                    )
            w.job = w.writer = None
            self.schedule(now, w.index, "claim")
            return None
        raise ValueError(kind)

    @staticmethod
    def sample() -> dict[str, Any]:
        return {"utilization": 0.9, "memory_used_bytes": 2**33, "taken_at": time.time()}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class HealthyBroker:
    """A broker that holds a wake-up for every due job: the reaper redispatches nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def dispatch(self, *, job_id: uuid.UUID, queue: str, priority: int) -> bool:
        self.sent += 1
        return True

    def pending(self, queue: str) -> int | None:
        return 10**9


def background(stop: threading.Event, every: float, fn: Any) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            fn()
            stop.wait(max(0.0, every - (time.monotonic() - started)))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- the worker processes


def split(workers: int, processes: int) -> list[tuple[int, int]]:
    """(first, count) of each process's share of the simulated workers."""
    base, extra = divmod(workers, processes)
    shares, first = [], 0
    for n in range(processes):
        count = base + (n < extra)
        shares.append((first, count))
        first += count
    return shares


def warmup(args: argparse.Namespace, settings: Settings) -> float:
    if args.warmup is not None:
        return float(args.warmup)
    return min(settings.heartbeat_interval, args.seconds / 3)


def simulate(
    url: str,
    args: argparse.Namespace,
    first: int,
    count: int,
    ids: list[uuid.UUID],
    ready: Any,
    results: Any,
) -> None:
    """One process's share of the fleet: its workers claim and beat for the warm-up, wait
    for every other process (and the parent's counters), then run ``--seconds`` measured."""
    dispose_engines()  # the forked parent's pooled connections are not this process's
    settings = Settings(database_url=url, broker_url="redis://127.0.0.1:1/0")
    fleet = Fleet(settings, args, deque(ids), first=first, count=count)
    fleet.register()
    fleet.run(warmup(args, settings))
    ready.wait()
    # a job's claim mostly falls in the warm-up (jobs outlast a short run): kept for its p99
    warm_claims = list(fleet.stats.latency.get("claim", []))
    for values in (*fleet.stats.latency.values(), fleet.stats.lag, fleet.stats.heartbeat_lag):
        values.clear()
    fleet.stats.checkpoints = 0
    running_at_start = sum(1 for w in fleet.workers if w.job is not None)
    fleet.run(args.seconds)
    # writes still waiting at the end, a quarter interval or more past due: a backlog
    late = time.monotonic() - settings.heartbeat_interval / 4
    with fleet.heap_lock:
        overdue = sum(1 for at, _, _ in fleet.heap if at < late)
    overdue += fleet.pool._work_queue.qsize()
    fleet.close()
    results.put(
        {
            "latency": dict(fleet.stats.latency),
            "lag": fleet.stats.lag,
            "heartbeat_lag": fleet.stats.heartbeat_lag,
            "checkpoints": fleet.stats.checkpoints,
            "running": sum(1 for w in fleet.workers if w.job is not None),
            "running_at_start": running_at_start,
            "overdue": overdue,
            "warm_claims": warm_claims,
        }
    )


def merge(parts: list[dict[str, Any]]) -> Stats:
    stats = Stats()
    for part in parts:
        for kind, values in part["latency"].items():
            stats.latency[kind].extend(values)
        stats.lag.extend(part["lag"])
        stats.heartbeat_lag.extend(part["heartbeat_lag"])
        stats.checkpoints += part["checkpoints"]
    return stats


def heartbeats_due(parts: list[dict[str, Any]], interval: float, elapsed: float) -> float:
    """Lease heartbeats the running jobs owed in the measured window (about: jobs that end or
    start inside it owe part of it)."""
    running = sum((p["running"] + p["running_at_start"]) / 2 for p in parts)
    return running * elapsed / interval


# ---------------------------------------------------------------- one phase


def phase(url: str, dsn: str, dbname: str, args: argparse.Namespace, size: int) -> dict[str, Any]:
    settings = Settings(database_url=url, broker_url="redis://127.0.0.1:1/0")
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT %s",
                (args.workers * 4,),
            )
        ]
        ended = conn.execute("SELECT id FROM jobs WHERE status = 'succeeded' LIMIT 1").fetchone()
    # the simulated workers, in --processes processes forked before this one starts threads
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(args.processes + 1)
    results: Any = ctx.Queue()
    shares = split(args.workers, args.processes)
    children = []
    for n, (first, count) in enumerate(shares):
        child = ctx.Process(
            target=simulate,
            args=(url, args, first, count, ids[n :: args.processes], ready, results),
            daemon=True,
        )
        child.start()
        children.append(child)
    stop = threading.Event()
    api: dict[str, list[float]] = defaultdict(list)
    reaper_passes: list[float] = []
    reaper = Reaper(settings, dispatcher=HealthyBroker())  # type: ignore[arg-type]
    registry = CollectorRegistry()
    registry.register(FleetCollector(settings))

    def reap() -> None:
        started = time.perf_counter()
        reaper.pass_once()
        reaper_passes.append(time.perf_counter() - started)

    def read_api() -> None:
        calls = {
            "get": lambda s: job_rows.get_job(session=s, tenant=None, job_id=ended[0]),
            "list": lambda s: job_rows.list_jobs(
                session=s, tenant=f"{TENANT}7", status=None, limit=50, cursor=None
            ),
            "list_queued": lambda s: job_rows.list_jobs(
                session=s, tenant=f"{TENANT}7", status=JobStatus.QUEUED, limit=50, cursor=None
            ),
            "fleet": lambda s: fleet_summary(session=s),
        }
        for name, call in calls.items():
            started = time.perf_counter()
            with session_scope(url) as session:
                call(session)
            api[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        generate_latest(registry)
        api["metrics"].append(time.perf_counter() - started)

    threads = [
        background(stop, settings.reaper_interval, reap),
        background(stop, args.api_every, read_api),
    ]
    ready.wait(timeout=warmup(args, settings) + 600)  # every worker claimed and beat once

    def commits() -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (dbname,),
            ).fetchone()
        return int(row[0]) if row else 0

    connections: list[int] = []
    sampler_stop = threading.Event()

    def sample_connections() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid()",
                (dbname,),
            ).fetchone()
        connections.append(int(row[0]) if row else 0)

    threads.append(background(sampler_stop, 1.0, sample_connections))
    for values in (*api.values(), reaper_passes):
        values.clear()
    before, started = commits(), time.monotonic()
    parts = [results.get(timeout=args.seconds + 600) for _ in children]
    elapsed = time.monotonic() - started
    after = commits()
    for child in children:
        child.join(timeout=60)
    stats = merge(parts)
    sampler_stop.set()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    running = sum(part["running"] for part in parts)
    # unfolded, each GPU sample is a transaction of its own
    in_memory = IN_MEMORY - {"telemetry"} if args.unfolded else IN_MEMORY
    return {
        "size": size,
        "tps": (after - before) / elapsed,
        "connections": max(connections or [0]),
        "running": running,
        "checkpoints_per_s": stats.checkpoints / elapsed,
        # the fleet's own transactions (the API's reads and the reaper's are not counted)
        "fleet_tps": sum(len(v) for k, v in stats.latency.items() if k not in in_memory) / elapsed,
        # of which a job's start and end (one each per job, whatever its length)
        "churn_tps": sum(len(stats.latency.get(k, [])) for k in CHURN) / elapsed,
        "latency": {k: list(v) for k, v in stats.latency.items()},
        "lag_p99": pct(stats.lag, 0.99),
        "heartbeat_lag": list(stats.heartbeat_lag),
        "heartbeats_due": heartbeats_due(parts, settings.heartbeat_interval, elapsed),
        "overdue": sum(part["overdue"] for part in parts),
        "claims": [t for part in parts for t in part["warm_claims"]] + stats.latency["claim"],
        "workers": args.workers,
        "reaper": reaper_passes,
        "api": dict(api),
        "pool": args.threads,
        "heartbeat": settings.heartbeat_interval,
    }


# ---------------------------------------------------------------- report


def ms(value: float) -> str:
    return f"{value * 1000:8.1f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace, hb: float) -> None:
    first, last = results[0], results[-1]
    for r in results:
        print(f"\n== {r['size']:,} queued + {r['size']:,} ended jobs, {args.workers} workers")
        print(
            f"Postgres transactions/s {r['tps']:8.1f} (the workers' {r['fleet_tps']:.1f})"
            f"   connections in use {r['connections']}"
            f"   running jobs {r['running']}   scheduler lag p99 {ms(r['lag_p99'])} ms"
        )
        print(f"{'statement':<18}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}")
        for kind, values in sorted(r["latency"].items()):
            print(f"{kind:<18}{len(values):>7}{ms(pct(values, 0.5))}{ms(pct(values, 0.99))}")
        for kind, values in sorted(r["api"].items()):
            print(
                f"{'api ' + kind:<18}{len(values):>7}{ms(pct(values, 0.5))}{ms(pct(values, 0.99))}"
            )
        c = r["claims"]
        print(f"{'claim (+ warm-up)':<18}{len(c):>7}{ms(pct(c, 0.5))}{ms(pct(c, 0.99))}")
        p = r["reaper"]
        print(f"{'reaper pass':<18}{len(p):>7}{ms(pct(p, 0.5))}{ms(max(p or [float('nan')]))}")
        lag, done = r["heartbeat_lag"], len(r["latency"].get("heartbeat", []))
        kept = kept_up(r)
        print(
            f"heartbeats {done} (~{r['heartbeats_due']:.0f} owed), lag p50 {ms(pct(lag, 0.5))} ms"
            f" p99 {ms(pct(lag, 0.99))} ms, writes overdue at the end {r['overdue']}: "
            + ("the simulator kept up" if kept else "THE SIMULATOR FELL BEHIND: figures understate")
        )

    def growth(get: Any) -> float:
        try:
            return float(get(last) / get(first))
        except (ZeroDivisionError, KeyError):
            return float("nan")

    def p99(kind: str, api: bool = False) -> Any:
        return lambda r: pct((r["api"] if api else r["latency"]).get(kind, []), 0.99)

    print(f"\n== growth {first['size']:,} -> {last['size']:,} queued (target beside it)")
    rows = [
        ("claim p99", growth(lambda r: pct(r["claims"], 0.99)), "<= 2x"),
        ("api get p99", growth(p99("get", True)), "<= 2x"),
        ("api list p99", growth(p99("list", True)), "<= 2x"),
        ("api fleet p99", growth(p99("fleet", True)), "flat"),
        ("api metrics p99", growth(p99("metrics", True)), "flat"),
        ("reaper pass p50", growth(lambda r: pct(r["reaper"], 0.5)), "<= 2x"),
    ]
    for name, value, target in rows:
        print(f"{name:<18}{value:8.2f}x   target {target}")
    budget = 1.2 * last["running"] / hb + last["checkpoints_per_s"]
    steady = last["fleet_tps"] - last["churn_tps"]
    print(
        f"{'steady tx/s':<18}{steady:8.1f}    target <= {budget:.1f}"
        f" (1.2 x {last['running']} running / {hb:g}s + {last['checkpoints_per_s']:.1f}"
        " checkpoints/s)"
    )
    print(
        f"{'  + starts, ends':<18}{last['churn_tps']:8.1f}    (claims and finishes: one each"
        f" per job of --job-seconds {args.job_seconds:g}; {last['fleet_tps']:.1f} in all)"
    )
    api_pools = 2 * settings_pool()
    if args.pgbouncer:
        target = f"<= {args.workers / 50:g} + {api_pools} (workers/50 + API and reaper pools)"
    else:
        target = f"<= {args.workers} (one per worker process)"
    print(
        f"{'connections':<18}{last['connections']:8d}    target {target}; each of the"
        f" {args.processes} simulating processes shares a pool of {last['pool']} threads"
        + (f" through PgBouncer (pool of {bouncer_pool(args)})" if args.pgbouncer else "")
    )
    behind = [r["size"] for r in results if not kept_up(r)]
    if behind:
        print(f"FLAGGED: the simulator fell behind at {behind} queued: read those as lower bounds")


def kept_up(r: dict[str, Any]) -> bool:
    """Heartbeats started within a quarter interval of due (p99), and no backlog of writes a
    quarter interval past due at the end (1 % of the workers allowed)."""
    lag = r["heartbeat_lag"]
    return bool(lag) and pct(lag, 0.99) <= r["heartbeat"] / 4 and r["overdue"] <= r["workers"] / 100


def settings_pool() -> int:
    from app.settings import get_settings

    return get_settings().db_pool_size


def bouncer_pool(args: argparse.Namespace) -> int:
    """PgBouncer's server connections: one per 50 workers (the API and reaper share them)."""
    return max(1, args.workers // 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--queued", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--threads", type=int, default=8, help="threads (and connections) per simulating process"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 1) * 2)),
        help="processes the simulated workers are spread over (default: 2 per core, up to 8)",
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="the fleet, reaper and API connect through a PgBouncer in transaction mode "
        "(tests/pgbouncer.py; scripts/get-pgbouncer)",
    )
    parser.add_argument("--progress-every", type=float, default=0.5)
    parser.add_argument("--checkpoint-every", type=float, default=60.0)
    parser.add_argument("--job-seconds", type=float, default=120.0)
    parser.add_argument("--api-every", type=float, default=0.5)
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds before measuring (default: one heartbeat interval; a big fleet's claims "
        "take longer than that on a small machine)",
    )
    parser.add_argument("--pg", help="host:port of a Postgres to use (superuser postgres)")
    parser.add_argument(
        "--unfolded",
        action="store_true",
        help="the earlier path: the keeper and every GPU sample write on their own",
    )
    args = parser.parse_args()
    address, server = start_postgres(args)
    bouncer = None
    results = []
    try:
        if args.pgbouncer:
            bouncer = start_bouncer(args, address, own=server is not None)
        for size in sorted(args.queued):
            dbname, url = create_database(address)
            try:
                started = time.monotonic()
                seed(url, admin_dsn(address, dbname), queued=size, ended=size)
                print(
                    f"seeded {size:,} + {size:,} jobs in {time.monotonic() - started:.1f}s",
                    flush=True,
                )
                if bouncer is not None:  # the fleet, reaper and API through it; seeding direct
                    url = url.replace(address, f"{bouncer.host}:{bouncer.port}")
                results.append(phase(url, admin_dsn(address, dbname), dbname, args, size))
            finally:
                if server is None:
                    drop_database(address, dbname)
        report(results, args, results[0]["heartbeat"])
    finally:
        if bouncer is not None:
            bouncer.stop()
        if server is not None:
            server.stop()


def start_bouncer(args: argparse.Namespace, address: str, *, own: bool) -> Any:
    """The suite's PgBouncer starter in front of ``address``. PgBouncer drops the timeouts
    that the engine sends as startup options, so on a Postgres of its own the bench puts them
    on the role, as the deployment notes say; a Postgres given with ``--pg`` is left as it is
    (its role's settings are not the bench's to change)."""
    from app.settings import get_settings
    from tests.pgbouncer import EmbeddedPgBouncer, role_timeouts

    host, _, port = address.rpartition(":")
    if own:
        role_timeouts(admin_dsn(address), get_settings())
    bouncer = EmbeddedPgBouncer(
        Path(tempfile.mkdtemp(prefix="fleet-scale-pgbouncer-")),
        pg_host=host,
        pg_port=int(port),
        pool_size=bouncer_pool(args),
    )
    return bouncer.start()


if __name__ == "__main__":
    main()
