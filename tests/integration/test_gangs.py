"""Gang leases on a real Postgres: N devices of one host in one statement, all or nothing, and
never a device under two holders. The fleet: host-4 with 4 A100s, host-2 with 2 T4s, each
device claimed by its own worker."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from app.db import devices as device_rows
from app.db import gangs, leases
from app.db.jobs import submit_job
from app.db.session import session_scope
from app.domain.spec import JobSpec
from app.settings import Settings
from tests.conftest import device_record
from workers.reaper import Reaper

HOSTS = {"host-4": ["GPU-a0", "GPU-a1", "GPU-a2", "GPU-a3"], "host-2": ["GPU-t0", "GPU-t1"]}
HOST_OF = {uuid_: host for host, uuids in HOSTS.items() for uuid_ in uuids}


@pytest.fixture
def fleet(settings: Settings) -> Settings:
    records = [
        dataclasses.replace(device_record(u, index=i), host="host-4")
        for i, u in enumerate(HOSTS["host-4"])
    ] + [
        dataclasses.replace(device_record(u, index=i, gpu_type="T4", gib=15), host="host-2")
        for i, u in enumerate(HOSTS["host-2"])
    ]
    with session_scope(settings.database_url) as s:
        device_rows.register_devices(session=s, devices=records)
        for r in records:
            assert device_rows.claim_device(
                session=s, uuids=[r.uuid], worker=_worker(r.uuid), ttl=60
            )
    return settings


def _worker(device: str) -> str:
    return f"w-{device}@{HOST_OF[device]}"


def _submit(settings: Settings, gpu_count: int = 1, **resources: object) -> uuid.UUID:
    spec = JobSpec.model_validate(
        {"framework": "torch", "resources": {"gpu_count": gpu_count, **resources}}
    )
    with session_scope(settings.database_url) as s:
        return submit_job(session=s, tenant="t", spec=spec).job_id


def _gang(
    settings: Settings, job_id: uuid.UUID, leader: str, n: int, gpu_type: object = "any"
) -> gangs.GangGrant | None:
    with session_scope(settings.database_url) as s:
        return gangs.acquire_gang(
            session=s,
            job_id=job_id,
            worker=_worker(leader),
            device_uuid=leader,
            host=HOST_OF[leader],
            gpu_count=n,
            gpu_type=gpu_type,  # type: ignore[arg-type]
            memory_gb=8,
            ttl=60,
        )


def _single(settings: Settings, job_id: uuid.UUID, device: str) -> leases.LeaseGrant | None:
    with session_scope(settings.database_url) as s:
        return leases.acquire_lease(
            session=s, job_id=job_id, worker=_worker(device), device_uuid=device, ttl=60
        )


def _gang_rows(settings: Settings) -> dict[str, tuple[uuid.UUID | None, int | None]]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(text("SELECT uuid, gang_job, gang_epoch FROM devices")).all()
    return {r.uuid: (r.gang_job, r.gang_epoch) for r in rows}


def test_a_gang_wins_n_devices_of_its_host_under_one_epoch(fleet: Settings) -> None:
    # Given a queued job of 2 GPUs, woken on host-4's third device
    job_id = _submit(fleet, gpu_count=2)
    # When that device's worker leads the gang
    grant = _gang(fleet, job_id, "GPU-a2", 2)
    # Then it holds its own device and the lowest free one of its host, under one epoch
    assert grant is not None and grant.devices == ["GPU-a0", "GPU-a2"]
    rows = _gang_rows(fleet)
    assert {u for u, (job, _) in rows.items() if job == job_id} == {"GPU-a0", "GPU-a2"}
    assert {rows[u][1] for u in grant.devices} == {grant.epoch}
    # And a member's own worker stays out: its single-GPU lease is refused
    other = _submit(fleet)
    assert _single(fleet, other, "GPU-a0") is None
    # While a device outside the gang still runs single jobs
    assert _single(fleet, other, "GPU-a1") is not None
    # And the job has one live lease, the leader's
    with session_scope(fleet.database_url) as s:
        live = (
            s.execute(
                text("SELECT worker FROM leases WHERE job_id = :j AND released_at IS NULL"),
                {"j": job_id},
            )
            .scalars()
            .all()
        )
    assert live == [_worker("GPU-a2")]


def test_all_or_nothing_and_never_two_hosts(fleet: Settings) -> None:
    # Given host-4 with one device busy on a single job
    busy = _submit(fleet)
    assert _single(fleet, busy, "GPU-a1") is not None
    gang = _submit(fleet, gpu_count=4)
    # When a gang of 4 is led there, or a gang of 3 from host-2 (host-4 still has 3 free)
    assert _gang(fleet, gang, "GPU-a0", 4) is None
    assert _gang(fleet, gang, "GPU-t0", 3) is None
    # Then nothing was taken and the job still waits, its epoch unchanged
    assert all(job is None for job, _ in _gang_rows(fleet).values())
    with session_scope(fleet.database_url) as s:
        status, epoch = s.execute(
            text("SELECT status, epoch FROM jobs WHERE id = :j"), {"j": gang}
        ).one()
    assert (status, epoch) == ("queued", 0)
    # And a gang of 2 on host-2's T4s (the type it lists) is won
    t4s = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-t1", 2, gpu_type=["V100", "T4"])
    assert t4s is not None and t4s.devices == ["GPU-t0", "GPU-t1"]


def test_a_gang_counts_only_devices_that_fit_it(fleet: Settings) -> None:
    # An A100-only gang led from a T4 host gets nothing; an A100 leader must fit too
    assert _gang(fleet, _submit(fleet, gpu_count=2), "GPU-t0", 2, gpu_type="A100") is None
    assert _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a0", 2, gpu_type="T4") is None


def test_released_and_ended_gangs_free_their_devices(fleet: Settings) -> None:
    first = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a0", 2)
    second = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a2", 2)
    assert first is not None and second is not None
    with session_scope(fleet.database_url) as s:
        # When the first gang's leader releases it
        freed = gangs.release_gang(session=s, job_id=first.job_id, epoch=first.epoch)
        assert sorted(freed) == first.devices
        # And the second gang's lease ends without a release (its leader died, then the lease
        # was closed)
        s.execute(
            text("UPDATE leases SET released_at = now() WHERE job_id = :j"), {"j": second.job_id}
        )
        assert sorted(gangs.free_ended_gangs(session=s, limit=10)) == second.devices
        assert gangs.free_ended_gangs(session=s, limit=10) == []
    # Then every device takes single jobs again
    for device in HOSTS["host-4"]:
        assert _single(fleet, _submit(fleet), device) is not None


def _race(
    settings: Settings,
    device: str,
    order: list[tuple[str, uuid.UUID]],
    barrier: threading.Barrier,
    errors: list[BaseException],
) -> None:
    """One device's worker, woken for every job at once: it tries them in ``order`` until it
    wins one (a gang it leads, or a single lease)."""
    try:
        barrier.wait()
        for kind, job_id in order:
            if kind == "gang":
                if _gang(settings, job_id, device, 2):
                    return
            elif _single(settings, job_id, device):
                return
    except BaseException as exc:
        errors.append(exc)


def test_racing_gangs_and_singles_never_oversubscribe_a_device(fleet: Settings) -> None:
    # Given host-4's four workers, each woken for two gangs of 2 and four single jobs at once
    rng = random.Random(12)
    for _ in range(8):
        gang_jobs = [_submit(fleet, gpu_count=2) for _ in range(2)]
        single_jobs = [_submit(fleet) for _ in range(4)]
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        jobs = [("gang", j) for j in gang_jobs] + [("single", j) for j in single_jobs]
        threads = [
            threading.Thread(
                target=_race, args=(fleet, d, rng.sample(jobs, len(jobs)), barrier, errors)
            )
            for d in HOSTS["host-4"]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        # Then no device is under two holders (a live single lease, a gang)
        with session_scope(fleet.database_url) as s:
            holders = s.execute(
                text(
                    """
                    SELECT d.uuid,
                           (SELECT count(*) FROM leases l
                             WHERE l.device_uuid = d.uuid AND l.released_at IS NULL
                               AND l.job_id <> coalesce(d.gang_job, gen_random_uuid()))
                           + (d.gang_job IS NOT NULL)::int AS n
                      FROM devices d WHERE d.host = 'host-4'
                    """
                )
            ).all()
            assert all(r.n <= 1 for r in holders), holders
            # And everything is given back for the next round
            s.execute(text("UPDATE leases SET released_at = now() WHERE released_at IS NULL"))
            s.execute(text("UPDATE jobs SET status = 'cancelled', finished_at = now()"))
            gangs.free_ended_gangs(session=s, limit=10)
            s.execute(text("UPDATE devices SET current_job = NULL"))


def test_a_silent_member_fences_the_gang_and_the_reaper_frees_its_devices(
    fleet: Settings,
) -> None:
    # Given a gang of 2 on host-4, led from GPU-a0
    grant = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a0", 2)
    assert grant is not None
    with session_scope(fleet.database_url) as s:
        beat = leases.heartbeat(session=s, job_id=grant.job_id, epoch=grant.epoch, ttl=60)
        assert beat is not None and beat.device_held
        # When the other member's worker stops heartbeating (killed, or SIGSTOP'd)
        s.execute(
            text("UPDATE devices SET expires_at = now() - interval '1 s' WHERE uuid = 'GPU-a1'")
        )
    # Then the leader's next heartbeat says to leave: the whole gang stops
    with session_scope(fleet.database_url) as s:
        beat = leases.heartbeat(session=s, job_id=grant.job_id, epoch=grant.epoch, ttl=60)
        assert beat is not None and not beat.device_held
    # And once the gang's lease is gone (reaped), a reaper pass frees its devices
    with session_scope(fleet.database_url) as s:
        s.execute(
            text("UPDATE leases SET expires_at = now() - interval '1 minute' WHERE job_id = :j"),
            {"j": grant.job_id},
        )
    Reaper(fleet.model_copy(update={"reaper_grace": 0})).pass_once()
    assert all(job is None for job, _ in _gang_rows(fleet).values())
    with session_scope(fleet.database_url) as s:
        assert s.scalar(text("SELECT status FROM jobs WHERE id = :j"), {"j": grant.job_id}) == (
            "queued"
        )


def test_devices_show_which_a_gang_holds(fleet: Settings) -> None:
    grant = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a3", 2)
    assert grant is not None
    with session_scope(fleet.database_url) as s:
        shown = {
            d["uuid"]: (d["gang"], d["current_job"]) for d in device_rows.list_devices(session=s)
        }
    held = {u for u, (gang, job) in shown.items() if gang and job == str(grant.job_id)}
    assert held == {"GPU-a0", "GPU-a3"}
    assert not any(gang for u, (gang, _) in shown.items() if u not in held)


def test_a_job_of_several_gpus_is_never_won_as_a_single_lease(fleet: Settings) -> None:
    # Given a queued gang job, woken on a free device
    job_id = _submit(fleet, gpu_count=2)
    # Then a single-GPU lease of it is refused, and a gang of it is won
    assert _single(fleet, job_id, "GPU-a0") is None
    with session_scope(fleet.database_url) as s:
        request = gangs.gang_request(session=s, job_id=job_id)
        assert request is not None and request.gpu_count == 2
        free = gangs.free_fitting_per_host(
            session=s, gpu_type="any", memory_gb=8, framework="torch"
        )
    assert free == {"host-4": 4, "host-2": 2}
    grant = _gang(fleet, job_id, "GPU-a1", 2)
    assert grant is not None and grant.as_lease().gang == ("GPU-a0", "GPU-a1")
    with session_scope(fleet.database_url) as s:
        # And the member sees whose gang holds it; host-4 has 2 devices free now
        held = gangs.membership(session=s, device_uuid="GPU-a0")
        assert held is not None and (held.job_id, held.leader) == (job_id, _worker("GPU-a1"))
        assert gangs.membership(session=s, device_uuid="GPU-a2") is None
        assert gangs.gang_request(session=s, job_id=job_id) is None  # running now
        free = gangs.free_fitting_per_host(
            session=s, gpu_type="any", memory_gb=8, framework="torch"
        )
    assert free == {"host-4": 2, "host-2": 2}


def test_a_gangs_telemetry_folds_in_every_member_device(fleet: Settings) -> None:
    # Given a gang of 2 on host-4 and a single job on another of its devices
    grant = _gang(fleet, _submit(fleet, gpu_count=2), "GPU-a2", 2)
    assert grant is not None and grant.devices == ["GPU-a0", "GPU-a2"]
    single = _submit(fleet)
    assert _single(fleet, single, "GPU-a1") is not None

    def sample(device: str, utilization: float, memory_gb: float) -> None:
        with session_scope(fleet.database_url) as s:
            device_rows.record_sample(
                session=s,
                uuid=device,
                worker=_worker(device),
                sample={"utilization": utilization, "memory_used_bytes": int(memory_gb * 1e9)},
            )

    # When each device's worker samples it
    sample("GPU-a2", 0.9, 10)  # the leader's
    sample("GPU-a0", 0.5, 30)  # the member's
    sample("GPU-a1", 0.1, 70)  # the single job's
    # Then the gang's statistics are over both its devices, and nothing of the single's
    with session_scope(fleet.database_url) as s:
        row = s.execute(
            text(
                "SELECT gpu_util_sum, gpu_util_samples, gpu_peak_memory_bytes FROM jobs"
                " WHERE id = :j"
            ),
            {"j": grant.job_id},
        ).one()
    assert row.gpu_util_samples == 2 and abs(row.gpu_util_sum - 1.4) < 1e-9
    assert row.gpu_peak_memory_bytes == int(30e9)


def test_a_waiting_gang_reserves_its_hosts_devices_and_starts_within_its_bound(
    fleet: Settings,
) -> None:
    from workers.gang_lease import sit_out, win
    from workers.identity import WorkerIdentity

    # Given host-2's T4s: one busy with a single-GPU job, and a stream of single-GPU T4 jobs
    host2 = fleet.model_copy(update={"hostname": "host-2", "gang_hold_s": 30})
    first = _submit(fleet, gpu_type="T4")
    assert _single(fleet, first, "GPU-t1") is not None
    stream = [_submit(fleet, gpu_type="T4") for _ in range(3)]
    # When a gang of 2 T4s is woken on the idle T4: it fits nowhere now, so its worker holds
    gang = _submit(fleet, gpu_count=2, gpu_type="T4")
    leader = WorkerIdentity(worker=_worker("GPU-t0"), device_uuid="GPU-t0", cuda=False)
    won: list[leases.LeaseGrant | None] = []
    holder = threading.Thread(target=lambda: won.append(win(host2, leader, gang)))
    holder.start()
    deadline = time.monotonic() + 10
    while {u for u, (job, _) in _reservations(fleet).items() if job == gang} != set(
        HOSTS["host-2"]
    ):
        assert time.monotonic() < deadline, _reservations(fleet)
        time.sleep(0.05)
    # Then the busy T4 keeps its job, but once that ends, the next single is refused there
    # (the device is kept for the gang) and its worker sits out, handing the wake-up back
    _end_single(fleet, first, "GPU-t1")
    assert _single(fleet, stream[0], "GPU-t1") is None
    member = WorkerIdentity(worker=_worker("GPU-t1"), device_uuid="GPU-t1", cuda=False)
    sitting: list[bool] = []
    sitter = threading.Thread(target=lambda: sitting.append(sit_out(host2, member, stream[0])))
    sitter.start()
    # And the gang starts on both T4s well within its bound
    holder.join(timeout=20)
    assert won and won[0] is not None and won[0].gang == ("GPU-t0", "GPU-t1"), won
    sitter.join(timeout=10)
    assert sitting == [True]
    assert all(job is None for job, _ in _reservations(fleet).values())
    # And the stream's jobs still wait (queued), to run after the gang
    with session_scope(fleet.database_url) as s:
        statuses = s.scalars(
            text("SELECT status FROM jobs WHERE id = ANY(:ids)"), {"ids": stream}
        ).all()
    assert set(statuses) == {"queued"}


def test_a_hold_gives_the_devices_back_after_its_bound(fleet: Settings) -> None:
    from workers.gang_lease import win
    from workers.identity import WorkerIdentity

    # Given host-2's second T4 busy for longer than the gang may hold
    host2 = fleet.model_copy(update={"hostname": "host-2", "gang_hold_s": 1})
    busy = _submit(fleet, gpu_type="T4")
    assert _single(fleet, busy, "GPU-t1") is not None
    gang = _submit(fleet, gpu_count=2, gpu_type="T4")
    leader = WorkerIdentity(worker=_worker("GPU-t0"), device_uuid="GPU-t0", cuda=False)
    started = time.monotonic()
    # When its worker holds for the gang: it gives up after its bound, and lets the devices go
    assert win(host2, leader, gang) is None
    assert 1 <= time.monotonic() - started < 10
    assert all(job is None for job, _ in _reservations(fleet).values())
    assert _single(fleet, _submit(fleet, gpu_type="T4"), "GPU-t0") is not None


def _reservations(settings: Settings) -> dict[str, tuple[uuid.UUID | None, object]]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(text("SELECT uuid, reserved_for, reserved_until FROM devices")).all()
    return {r.uuid: (r.reserved_for, r.reserved_until) for r in rows}


def _end_single(settings: Settings, job_id: uuid.UUID, device: str) -> None:
    """The single-GPU job on ``device`` ends (its supervisor marks the device idle)."""
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE leases SET released_at = now() WHERE job_id = :j"), {"j": job_id})
        s.execute(text("UPDATE jobs SET status = 'succeeded' WHERE id = :j"), {"j": job_id})
        device_rows.set_current_job(session=s, uuid=device, worker=_worker(device), job_id=None)
