"""Replay a synthetic GPU workload on a simulated fleet, beside an ideal scheduler.

    .venv/bin/python bench/replay.py [--jobs 60] [--seed 1] [--no-defer-too]

The workload (seeded): Poisson arrivals at a target load, lognormal durations, and a type mix
on a fleet with a plentiful type and a scarce one (5 ``T4:16`` and 2 ``A100:80`` by default):
most jobs take any GPU, some need the A100's memory, a few ask for T4. Each job is a custom
entrypoint that holds its GPU for its duration (``tests.custom_trainers.probes:sleep_steps``),
submitted through the real API, at its arrival time, to real workers (one ``gpufleet worker``
per GPU, warm spares on), a reaper, an embedded PostgreSQL and Redis.

Beside it, a discrete-event simulation of an ideal greedy scheduler on the same jobs and fleet:
zero overhead, and at every arrival or completion each waiting job, oldest first, starts on a
free fitting GPU of the most plentiful fitting type.

Printed side by side: queueing delay (submit -> trainer running; ideal: arrival -> start)
mean/p95/max, makespan, utilization (work / capacity over the makespan), start overhead
(lease -> trainer running, and submit -> trainer running when a fitting GPU was idle), the
idle gap on a busy device (a lease released while a job it fits waited -> its next lease),
and work-conservation violations (jobs that waited while a fitting GPU sat idle > 2 s).
With ``--no-defer-too`` the same trace runs again with ``GPUFLEET_SCARCE_DEFER_S=0``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from app.db.session import session_scope  # noqa: E402
from app.domain.routing import device_fits  # noqa: E402
from bench.rig import private_fleet  # noqa: E402

STEP_S = 0.01  # one step of the sleeping entrypoint
VIOLATION_S = 2.0


@dataclass(frozen=True)
class Gpu:
    name: str
    gpu_type: str
    gib: float


@dataclass(frozen=True)
class TraceJob:
    index: int
    arrival: float  # seconds after the replay starts
    duration: float
    gpu_type: str  # "any" or one type
    memory_gb: float

    def fits(self, gpu: Gpu) -> bool:
        return device_fits(
            device_type=gpu.gpu_type,
            device_memory_gib=gpu.gib,
            job_type=self.gpu_type,
            job_memory_gb=self.memory_gb,
        )


@dataclass
class Ran:
    """What happened to one job: times in seconds on one clock."""

    job: TraceJob
    submitted: float
    started: float  # trainer running (ideal: start)
    ended: float
    gpu: str
    leased: float | None = None

    @property
    def held_from(self) -> float:
        """When the job took its GPU: the lease (ideal: the start)."""
        return self.leased if self.leased is not None else self.started


def parse_fleet(text_: str) -> list[Gpu]:
    gpus = []
    for i, item in enumerate(text_.split(",")):
        gpu_type, gib = item.split(":")
        gpus.append(Gpu(f"{gpu_type}#{i}", gpu_type, float(gib) * 0.94))
    return gpus


def make_trace(n: int, seed: int, gpus: list[Gpu], load: float, median_s: float) -> list[TraceJob]:
    rng = random.Random(seed)
    sigma = 0.6
    mean = median_s * math.exp(sigma**2 / 2)
    rate = load * len(gpus) / mean
    t, jobs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        duration = min(max(rng.lognormvariate(math.log(median_s), sigma), 0.5), 6 * median_s)
        kind = rng.random()
        if kind < 0.20:
            gpu_type, memory = "any", 40.0  # needs the big GPU's memory
        elif kind < 0.30:
            gpu_type, memory = "T4", 8.0
        else:
            gpu_type, memory = "any", 8.0
        jobs.append(TraceJob(i, t, round(duration / STEP_S) * STEP_S, gpu_type, memory))
    return jobs


def rarity_order(job: TraceJob, gpus: list[Gpu]) -> dict[str, int]:
    counts = Counter(g.gpu_type for g in gpus if job.fits(g))
    return dict(counts)


def ideal(trace: list[TraceJob], gpus: list[Gpu]) -> list[Ran]:
    """Greedy, zero-overhead, oldest waiting job first, most plentiful fitting type first."""
    free = {g.name: g for g in gpus}
    waiting: list[TraceJob] = []
    events: list[tuple[float, int, str, Any]] = []
    for job in trace:
        heapq.heappush(events, (job.arrival, 1, "arrive", job))
    ran: list[Ran] = []
    seq = 2
    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            waiting.append(item)
        else:
            free[item.name] = item
        for job in list(waiting):
            fitting = [g for g in free.values() if job.fits(g)]
            if not fitting:
                continue
            counts = rarity_order(job, gpus)
            gpu = max(fitting, key=lambda g: (counts[g.gpu_type], g.name))
            del free[gpu.name]
            waiting.remove(job)
            ran.append(Ran(job, job.arrival, now, now + job.duration, gpu.name))
            seq += 1
            heapq.heappush(events, (now + job.duration, seq, "free", gpu))
    return ran


def spec(job: TraceJob) -> dict[str, Any]:
    return {
        "name": f"replay-{job.index}",
        "entrypoint": "tests.custom_trainers.probes:sleep_steps",
        "training": {"max_steps": max(1, round(job.duration / STEP_S)), "epochs": 1},
        "resources": {"gpu_type": job.gpu_type, "memory_gb": job.memory_gb},
        "max_attempts": 1,
    }


def replay(
    trace: list[TraceJob], fleet_spec: str, tmp: Path, defer_s: float | None
) -> tuple[list[Ran], list[Gpu]]:
    """The trace through the real system; returns what ran where, on the database's clock."""
    env = {
        "GPUFLEET_HEARTBEAT_INTERVAL": "1",
        "GPUFLEET_LEASE_TTL": "8",
        "GPUFLEET_REAPER_INTERVAL": "2",
    }
    if defer_s is not None:
        env["GPUFLEET_SCARCE_DEFER_S"] = str(defer_s)
    with private_fleet(tmp, env) as (fleet, db_url):
        fleet.start_api()
        fleet.start_reaper()
        count = len(fleet_spec.split(","))
        for i in range(count):
            fleet.start_worker(f"worker-{i}", fake_gpus=fleet_spec, host="replay-host")
        fleet.wait_workers_ready(count, timeout=180)
        time.sleep(10.0 + 2.5 * count)  # every spare has imported torch
        ids: dict[str, TraceJob] = {}
        start = time.monotonic()
        for job in trace:
            time.sleep(max(0.0, start + job.arrival - time.monotonic()))
            ids[fleet.submit(spec(job))] = job
        final = fleet.wait_final(list(ids), timeout=600)
        bad = {j: (f["status"], f["error"]) for j, f in final.items() if f["status"] != "succeeded"}
        if bad:
            raise RuntimeError(f"jobs did not succeed: {bad}")
        time.sleep(2.0)  # the last log lines reach the database
        return collect(db_url, ids), fleet_gpus(db_url)


def fleet_gpus(db_url: str) -> list[Gpu]:
    with session_scope(db_url) as s:
        rows = s.execute(text("SELECT uuid, gpu_type, memory_bytes FROM devices")).all()
    return [Gpu(r.uuid, r.gpu_type, r.memory_bytes / 2**30) for r in rows]


def collect(db_url: str, ids: dict[str, TraceJob]) -> list[Ran]:
    with session_scope(db_url) as s:
        rows = s.execute(
            text(
                """
                SELECT j.id::text AS id, extract(epoch FROM j.created_at) AS submitted,
                       extract(epoch FROM l.acquired_at) AS leased,
                       extract(epoch FROM l.released_at) AS released, l.device_uuid,
                       (SELECT string_agg(chunk, '') FROM job_logs g WHERE g.job_id = j.id) AS out
                  FROM jobs j JOIN leases l ON l.job_id = j.id
                 WHERE j.id = ANY(CAST(:ids AS uuid[]))
                """
            ),
            {"ids": list(ids)},
        ).all()
    ran = []
    for r in rows:
        called = float(r.out.split("CALLED_AT ")[1].split()[0])
        ran.append(
            Ran(
                ids[r.id],
                float(r.submitted),
                called,
                float(r.released),
                r.device_uuid,
                float(r.leased),
            )
        )
    return ran


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def idle_intervals(
    ran: list[Ran], gpus: list[Gpu], horizon: tuple[float, float]
) -> dict[str, list[tuple[float, float]]]:
    """Per GPU, when it had no job, within the replay's horizon."""
    by_gpu: dict[str, list[Ran]] = {g.name: [] for g in gpus}
    for r in ran:
        by_gpu[r.gpu].append(r)
    idle: dict[str, list[tuple[float, float]]] = {}
    for name, runs in by_gpu.items():
        runs.sort(key=lambda r: r.held_from)
        t, spans = horizon[0], []
        for r in runs:
            if r.held_from > t:
                spans.append((t, r.held_from))
            t = max(t, r.ended)
        if horizon[1] > t:
            spans.append((t, horizon[1]))
        idle[name] = spans
    return idle


def summarize(ran: list[Ran], gpus: list[Gpu]) -> dict[str, float]:
    first = min(r.submitted for r in ran)
    last = max(r.ended for r in ran)
    delays = [r.started - r.submitted for r in ran]
    work = sum(r.job.duration for r in ran)
    by_name = {g.name: g for g in gpus}
    idle = idle_intervals(ran, gpus, (first, last))
    # jobs that waited while a fitting GPU sat idle for more than VIOLATION_S
    violations = 0
    for r in ran:
        for name, spans in idle.items():
            if not r.job.fits(by_name[name]):
                continue
            if any(min(b, r.held_from) - max(a, r.submitted) > VIOLATION_S for a, b in spans):
                violations += 1
                break
    # idle gap on a busy device: from a release while a job it fits waited, to its next lease
    # or to the moment no such job waits any more (it started elsewhere), whichever is first
    gaps = []
    for name in by_name:
        runs = sorted((r for r in ran if r.gpu == name), key=lambda r: r.ended)
        for cur, nxt in itertools.pairwise(runs):
            waited = [
                o.held_from
                for o in ran
                if o.submitted <= cur.ended < o.held_from and o.job.fits(by_name[name])
            ]
            if waited:
                gaps.append(max(0.0, min(nxt.held_from, max(waited)) - cur.ended))
    overhead = [r.started - r.leased for r in ran if r.leased is not None]
    return {
        "delay_mean": statistics.mean(delays),
        "delay_p95": pct(delays, 0.95),
        "delay_max": max(delays),
        "makespan": last - first,
        "utilization": work / (len(gpus) * (last - first)),
        "overhead_p50": pct(overhead, 0.5) if overhead else float("nan"),
        "overhead_p95": pct(overhead, 0.95) if overhead else float("nan"),
        "gap_p50": pct(gaps, 0.5),
        "gap_p95": pct(gaps, 0.95),
        "violations": violations / len(ran),
        "scarce_any": scarce_share(ran, gpus),
    }


def scarce_share(ran: list[Ran], gpus: list[Gpu]) -> float:
    """Of the small any-type jobs, the share that ran on the fleet's scarcest type."""
    counts = Counter(g.gpu_type for g in gpus)
    scarce = min(counts, key=lambda t: counts[t])
    by_name = {g.name: g for g in gpus}
    small = [r for r in ran if r.job.gpu_type == "any" and r.job.memory_gb <= 16]
    return sum(by_name[r.gpu].gpu_type == scarce for r in small) / max(1, len(small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet", default="T4:16,T4:16,T4:16,T4:16,T4:16,A100:80,A100:80")
    parser.add_argument("--load", type=float, default=0.6, help="offered load (0-1)")
    parser.add_argument("--median", type=float, default=10.0, help="median job seconds")
    parser.add_argument("--no-defer-too", action="store_true", help="also run without placement")
    args = parser.parse_args()
    planned = parse_fleet(args.fleet)
    trace = make_trace(args.jobs, args.seed, planned, args.load, args.median)
    results: dict[str, dict[str, float]] = {"ideal": summarize(ideal(trace, planned), planned)}
    modes = [("gpufleet", None)] + ([("no placement", 0.0)] if args.no_defer_too else [])
    for label, defer_s in modes:
        with tempfile.TemporaryDirectory(prefix="gpufleet-replay-") as tmp:
            ran, gpus = replay(trace, args.fleet, Path(tmp), defer_s)
        results[label] = summarize(ran, gpus)
    print(
        f"{len(trace)} jobs, fleet {args.fleet}, load {args.load}, median {args.median}s, "
        f"seed {args.seed}; seconds unless said"
    )
    rows = [
        ("queueing delay mean", "delay_mean", "<= 1.1x ideal"),
        ("queueing delay p95", "delay_p95", "<= 1.1x ideal"),
        ("queueing delay max", "delay_max", ""),
        ("makespan", "makespan", ""),
        ("utilization", "utilization", ""),
        ("lease -> trainer running p50", "overhead_p50", ""),
        ("lease -> trainer running p95", "overhead_p95", ""),
        ("idle gap on a busy GPU p50", "gap_p50", "<= 0.100"),
        ("idle gap on a busy GPU p95", "gap_p95", "<= 0.500"),
        ("jobs with a fitting GPU idle > 2 s", "violations", "<= 1% of jobs"),
        ("small any-type jobs on the scarce type", "scarce_any", ""),
    ]
    labels = list(results)
    print(f"{'':40s}" + "".join(f"{label:>14s}" for label in labels) + "   ratio   target")
    for title, key, target in rows:
        values = [results[label][key] for label in labels]
        ratio = (
            results["gpufleet"][key] / results["ideal"][key]
            if results["ideal"][key]
            else float("nan")
        )
        show = "".join(f"{v:14.3f}" for v in values)
        print(f"{title:40s}{show}   {ratio:5.2f}   {target}")


if __name__ == "__main__":
    main()
