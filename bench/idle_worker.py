"""What an idle worker costs: memory and CPU of its process tree, with and without its spare.

    .venv/bin/python bench/idle_worker.py [--seconds 30]

One ``gpufleet worker`` (one simulated GPU, default intervals) on an embedded PostgreSQL and
Redis, started twice: ``GPUFLEET_WARM_SPARE=1`` (the default) and ``0``. Once it is ready and
its spare has imported torch, the bench sums over the worker's process tree (Celery main
process, pool process, spare trainer; with ``GPUFLEET_TRAINER_START=fork``, the default, the fork
server instead, and its forked spare once a job has run) the resident memory (RSS, and PSS,
which counts pages shared between them once) and the CPU time used over ``seconds`` of idling,
from /proc.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rig import private_fleet  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(warm: bool, seconds: float, tmp: Path) -> dict[str, float]:
    with private_fleet(tmp, {"GPUFLEET_WARM_SPARE": "1" if warm else "0"}) as (fleet, _):
        fleet.start_api()
        worker = fleet.start_worker("worker", fake_gpus="A100:80", host="idle")
        fleet.wait_workers_ready(1, timeout=120)
        time.sleep(20.0)  # the spare has imported torch
        tree = worker.tree()
        before = sum(cpu_s(p) for p in tree)
        time.sleep(seconds)
        used = sum(cpu_s(p) for p in tree) - before
        mem = [memory_kib(p) for p in tree]
        return {
            "processes": len(tree),
            "rss_mib": sum(m[0] for m in mem) / 1024,
            "pss_mib": sum(m[1] for m in mem) / 1024,
            "cpu_pct": 100 * used / seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"one idle worker, {args.seconds:g} s")
    for warm in (False, True):
        with tempfile.TemporaryDirectory(prefix="gpufleet-idle-") as tmp:
            m = measure(warm, args.seconds, Path(tmp))
        label = "with its spare" if warm else "without a spare"
        print(
            f"{label:18s} {m['processes']:.0f} processes  RSS {m['rss_mib']:6.0f} MiB  "
            f"PSS {m['pss_mib']:6.0f} MiB  CPU {m['cpu_pct']:5.2f}% of one core"
        )


if __name__ == "__main__":
    main()
