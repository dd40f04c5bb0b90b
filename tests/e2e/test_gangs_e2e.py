"""Jobs of several GPUs, end to end, on simulated hosts: host-4 (4 fake A100s = 4 workers with
the same GPUFLEET_HOSTNAME) and host-2 (2 more). The ranks train for real (gloo on the CPU)."""

from __future__ import annotations

import itertools
import os
import signal
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.fleet import Fleet, Proc, cmdline, small_job, wait_for

pytestmark = pytest.mark.e2e

#: 2 ranks against one process at the same global batch: the same full-batch gradient summed
#: in another order (tests/integration/test_trainers_ddp.py measures ~1e-7 relative).
LOSS_TOLERANCE = 1e-5

HOSTS = {"host-4": 4, "host-2": 2}


def _start_host(fleet: Fleet, host: str) -> dict[str, Proc]:
    n = HOSTS[host]
    return {
        f"{host}/{i}": fleet.start_worker(
            f"worker-{host}-{i}", fake_gpus=",".join(["A100:80"] * n), host=host
        )
        for i in range(n)
    }


def _worker_proc(workers: dict[str, Proc], name: str) -> Proc:
    """The worker process that claimed a device under ``name`` (``A100-2@host-4``)."""
    for proc in workers.values():
        if f" as {name};" in proc.log():
            return proc
    raise AssertionError(f"no worker process named {name}")


def _attempts(fleet: Fleet, job_id: str) -> list[dict[str, Any]]:
    """Each lease of the job: its devices (a gang's, or the one), hosts, and when it held them."""
    events = fleet.get(f"/v1/jobs/{job_id}/events?limit=500")["events"]
    ends: dict[int, datetime] = {}
    for e in events:
        if e["epoch"] is not None:
            ends[e["epoch"]] = datetime.fromisoformat(e["at"])
    hosts = {d["uuid"]: d["host"] for d in fleet.get("/v1/devices")["devices"]}
    found = []
    for e in events:
        if e["kind"] == "leased":
            devices = e["data"].get("gang") or [e["data"]["device"]]
            found.append(
                {
                    "epoch": e["epoch"],
                    "worker": e["data"]["worker"],
                    "devices": devices,
                    "hosts": {hosts[d] for d in devices},
                    "from": datetime.fromisoformat(e["at"]),
                    "to": ends[e["epoch"]],
                }
            )
    return found


def _gang_job(**training: Any) -> dict[str, Any]:
    return small_job(
        resources={"gpu_type": "A100", "memory_gb": 8, "gpu_count": 2},
        training={"epochs": 1, "checkpoint_every_steps": 10, **training},
    )


def _sleeper(steps: int) -> dict[str, Any]:
    """A single-GPU job that holds its device for ``steps`` x 10 ms and trains nothing."""
    return small_job(
        framework=None,
        entrypoint="tests.custom_trainers.probes:sleep_steps",
        training={"max_steps": steps},
        resources={"gpu_type": "A100", "memory_gb": 8},
    )


def test_gangs_train_like_one_process_on_one_host_and_never_share_a_device(fleet: Fleet) -> None:
    # Given host-4 and host-2
    fleet.start_api()
    fleet.start_reaper()
    _start_host(fleet, "host-4")
    _start_host(fleet, "host-2")
    fleet.wait_workers_ready(6, timeout=120)
    # When two gangs of 2, a gang of 3 and three single-GPU jobs are submitted at once, and the
    # gang's job once more on one process (the same global batch)
    gangs = [fleet.submit(_gang_job()) for _ in range(2)]
    three = fleet.submit(
        small_job(resources={"gpu_type": "A100", "gpu_count": 3}, training={"max_steps": 5})
    )
    singles = [fleet.submit(_sleeper(100)) for _ in range(3)]
    one = fleet.submit(small_job(resources={"gpu_type": "A100"}, training={"epochs": 1}))
    final = fleet.wait_final([*gangs, three, *singles, one], timeout=240)
    # Then all succeed; a gang's loss is the one process's within the stated tolerance, and
    # both gangs (same spec) end with the same weights
    assert {j["status"] for j in final.values()} == {"succeeded"}, final
    reference = final[one]["result"]["final_loss"]
    for job_id in gangs:
        loss = final[job_id]["result"]["final_loss"]
        assert abs(loss - reference) <= LOSS_TOLERANCE * abs(reference), (loss, reference)
    assert len({final[j]["result"]["weights_sha256"] for j in gangs}) == 1
    assert final[gangs[0]]["spec"]["distributed_training"] is True
    # And each gang held as many devices as it asked for, all of one host, under one lease
    attempts = {j: _attempts(fleet, j) for j in final}
    for job_id, want in [(gangs[0], 2), (gangs[1], 2), (three, 3)]:
        (attempt,) = attempts[job_id]
        assert len(set(attempt["devices"])) == want and len(attempt["hosts"]) == 1, attempt
    # And the gang of 3 ran on host-4, the only host with 3 devices
    assert attempts[three][0]["hosts"] == {"host-4"}
    # And no device ever had two holders at once: per device, the holds do not overlap
    holds: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for job_id, tries in attempts.items():
        for attempt in tries:
            for device in attempt["devices"]:
                holds.setdefault(device, []).append((attempt["from"], attempt["to"], job_id))
    for device, spans in holds.items():
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            assert start >= end, f"{device}: {a} until {end} overlaps {b} from {start}"
    # And every gang device is free again
    devices = fleet.get("/v1/devices")["devices"]
    assert not any(d["gang"] or d["current_job"] for d in devices), devices


def test_a_killed_leader_stops_its_gang_which_resumes_on_the_other_host_bit_for_bit(
    fleet: Fleet,
) -> None:
    # Given host-4 with two of its devices busy on long single-GPU jobs
    fleet.start_api()
    fleet.start_reaper()
    host4 = _start_host(fleet, "host-4")
    fleet.wait_workers_ready(4, timeout=120)
    busy = [fleet.submit(_sleeper(20_000)) for _ in range(2)]
    for job_id in busy:
        wait_for(lambda j=job_id: fleet.job(j)["lease"], timeout=60, what="a single's lease")
    # And a gang of 2 running on host-4's other two devices (then host-2 starts)
    training = {"epochs": 2}
    job_id = fleet.submit({**_gang_job(**training), "faults": {"step_delay_s": 0.1}})
    lease = wait_for(lambda: fleet.job(job_id)["lease"], timeout=60, what="the gang's lease")
    assert lease["host"] == "host-4"
    host2 = _start_host(fleet, "host-2")
    leader = _worker_proc(host4, lease["worker"])
    ranks = wait_for(
        lambda: _ranks(leader) if len(_ranks(leader)) == 2 else None,
        timeout=60,
        what="the gang's 2 ranks under its leader",
    )
    assert len(ranks) == 2
    # When the leader's worker is killed with SIGKILL after the second checkpoint (its Celery
    # processes only: the ranks are not signalled)
    wait_for(
        lambda: (fleet.job(job_id)["checkpoint"] or {}).get("step", 0) >= 20,
        timeout=120,
        what="the second checkpoint",
    )
    for pid in leader.tree():
        if pid not in ranks:
            os.kill(pid, signal.SIGKILL)
    # Then both ranks stop (they die with their supervisor)
    wait_for(
        lambda: not any(_alive(p) for p in ranks),
        timeout=30,
        what="both ranks to stop",
    )
    # And the job resumes on host-2's two devices (host-4 has one free device left) and ends
    # with the weights of an uninterrupted 2-rank run, bit for bit
    fleet.wait_workers_ready(5, timeout=120)
    reference_id = fleet.submit(_gang_job(**training))
    final = fleet.wait_final([job_id, reference_id], timeout=240)
    resumed, reference = final[job_id], final[reference_id]
    assert resumed["status"] == reference["status"] == "succeeded", resumed
    tries = _attempts(fleet, job_id)
    assert [t["hosts"] for t in tries] == [{"host-4"}, {"host-2"}], tries
    assert any(e["kind"] == "resumed" for e in fleet.get(f"/v1/jobs/{job_id}/events")["events"])
    assert resumed["result"]["weights_sha256"] == reference["result"]["weights_sha256"]
    assert resumed["result"]["final_loss"] == reference["result"]["final_loss"]
    assert host2  # (the fleet stops every process, the sleeping singles' too)


def _ranks(worker: Proc) -> list[int]:
    return [p for p in worker.tree() if "workers.trainers.main" in cmdline(p)]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
