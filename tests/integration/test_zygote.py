"""Trainers forked from the worker's fork server (``workers.zygote``), through the supervisor on
a real Postgres: they run jobs as spawned trainers do, and the zygote is replaced when stale and
restarted when it dies."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.settings import Settings
from tests.integration.test_supervisor import (
    IDENTITY,
    _log_text,
    make_due,
    spec,
    submit,
    view,
)
from workers import watch
from workers.supervisor import Outcome, Supervisor
from workers.trainers.protocol import CONTROL_FD_ENV
from workers.warm_spare import WarmSpare

#: a zygote imports torch on a loaded, shared machine: seconds, at times tens of them.
READY_S = 120.0


@pytest.fixture(scope="module")
def shared_spare() -> Iterator[WarmSpare]:
    """One spare and zygote for the module: a zygote takes seconds to import torch here."""
    spare = WarmSpare("fork")
    yield spare
    spare.discard()
    if spare.zygote is not None:
        spare.zygote.stop()


def ready(spare: WarmSpare) -> WarmSpare:
    """``spare`` forked from a ready zygote (started again if stale or gone)."""
    zygote = spare.zygote
    assert zygote is not None
    zygote.failures = 0
    zygote.start()
    assert zygote.wait_ready(READY_S)
    spare.start("torch")
    return spare


@pytest.fixture
def forking(shared_spare: WarmSpare) -> WarmSpare:
    """The module's spare, forked from a ready zygote."""
    return ready(shared_spare)


@pytest.fixture
def allowed(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"entrypoint_allow": "tests.custom_trainers", "fault_injection": True}
    )


def run_probe(settings: Settings, spare: WarmSpare | None) -> dict[str, Any]:
    """Run the ``report_process`` probe as a job; what it printed about its process."""
    job_id = submit(settings, spec(entrypoint="tests.custom_trainers.probes:report_process"))
    assert Supervisor(settings, IDENTITY, spare=spare).run(job_id) == Outcome.SUCCEEDED
    line = next(x for x in _log_text(settings, job_id).splitlines() if x.startswith("PROCESS "))
    facts: dict[str, Any] = json.loads(line.removeprefix("PROCESS "))
    return facts


def test_a_forked_trainer_gets_exactly_the_environment_of_a_spawned_one(
    allowed: Settings, forking: WarmSpare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose environment holds secrets and a thread count for the trainers
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", allowed.database_url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-key")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    ready(forking)  # (a zygote of that environment)
    # When one job runs in a trainer spawned cold and one in a trainer forked by the zygote
    spawned = run_probe(allowed, None)
    forked = run_probe(allowed, forking)
    # Then the forked one is the zygote's child, torch imported before the job
    assert forking.zygote is not None
    assert forked["ppid"] == forking.zygote.pid and forked["preloaded"]
    assert spawned["ppid"] == os.getpid()
    # and both see the same variables, values and all (the control pipe's fd number aside)
    assert forked["env"].pop(CONTROL_FD_ENV) and spawned["env"].pop(CONTROL_FD_ENV)
    assert forked["env"] == spawned["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in forked["env"]
    assert forked["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    # and torch's thread count follows the environment, as in a fresh interpreter
    assert forked["threads"] == spawned["threads"] == 1


def test_a_run_resumed_on_the_fork_path_ends_bit_identical_to_an_uninterrupted_one(
    allowed: Settings, forking: WarmSpare
) -> None:
    supervisor = Supervisor(allowed, IDENTITY, spare=forking)
    # Given an uninterrupted run, in a forked trainer
    whole = submit(allowed, spec())
    assert supervisor.run(whole) == Outcome.SUCCEEDED
    # When the same job fails transiently after its first checkpoint and a new forked trainer
    # resumes it from that checkpoint
    broken = submit(allowed, spec(faults={"fail_at_step": 3, "fail_with": "transient"}))
    assert supervisor.run(broken) == Outcome.REQUEUED
    make_due(allowed, broken)
    assert supervisor.run(broken) == Outcome.SUCCEEDED
    # Then it ended with the same weights, bit for bit
    resumed = view(allowed, broken)
    assert resumed["attempts"] == 2
    assert "resumed from step 2" in _log_text(allowed, broken)
    assert resumed["result"]["weights_sha256"] == view(allowed, whole)["result"]["weights_sha256"]


def test_a_forked_spare_runs_the_next_job_and_a_fresh_one_replaces_it(
    allowed: Settings, forking: WarmSpare
) -> None:
    assert forking.trainer is not None
    first = forking.trainer.pid
    facts = run_probe(allowed, forking)
    assert facts["pid"] == first
    assert forking.trainer is not None and forking.trainer.poll() is None
    assert forking.trainer.pid != first
    # (its predecessor was reaped by the zygote: no zombie is left behind)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{first}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{first}")


def test_a_dead_zygote_falls_back_to_spawning_and_is_restarted(
    allowed: Settings, forking: WarmSpare
) -> None:
    zygote = forking.zygote
    assert zygote is not None and zygote.pid is not None and forking.trainer is not None
    old_zygote, old_spare = zygote.pid, forking.trainer
    # When the zygote dies (its spare dies with it)
    os.kill(old_zygote, signal.SIGKILL)
    assert old_spare.proc.wait(timeout=30) == -signal.SIGKILL
    # Then the next job still runs, in a trainer the worker spawns itself (the lease is held:
    # no waiting for a zygote), and a new zygote is on its way
    assert run_probe(allowed, forking)["ppid"] == os.getpid()
    assert zygote.pid not in (None, old_zygote)
    # And once it has imported torch, trainers are forked from it again
    assert run_probe(allowed, ready(forking))["ppid"] == zygote.pid
    # And a zygote that keeps dying is given up: spares are spawned by the worker itself
    zygote.failures = zygote.MAX_FAILURES
    forking.discard()
    forking.start("torch")
    assert forking.trainer is not None
    assert run_probe(allowed, forking)["ppid"] == os.getpid()


def test_a_stale_zygote_is_replaced(
    allowed: Settings, forking: WarmSpare, monkeypatch: pytest.MonkeyPatch
) -> None:
    zygote = forking.zygote
    assert zygote is not None
    first = zygote.pid
    # When the worker's environment changes (a trainer would get another one)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawned = run_probe(allowed, forking)
    # Then the job ran at once in a spawned trainer, and the zygote was replaced
    assert spawned["ppid"] == os.getpid()
    assert zygote.pid not in (None, first)
    # and the new one forks trainers with the new environment
    forked = run_probe(allowed, ready(forking))
    assert forked["ppid"] == zygote.pid and forked["env"]["OMP_NUM_THREADS"] == "1"
    # And when the trainer code changes on disk, the zygote is replaced again
    second = zygote.pid
    touched = time.time() + 5
    from workers.trainers import warm

    os.utime(warm.__file__, (touched, touched))
    try:
        run_probe(allowed, forking)
        assert zygote.pid not in (None, first, second)
    finally:
        os.utime(warm.__file__, None)


def test_the_supervisor_sees_a_forked_trainer_s_exit_at_once_not_at_its_next_tick(
    allowed: Settings, forking: WarmSpare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the loop's tick and the heartbeat a minute away, only the trainer's exit descriptor
    # can wake the loop: without it this run lasts a minute (the GPU leased all along).
    monkeypatch.setattr(watch, "TICK_S", 60.0)
    slow_ticks = allowed.model_copy(update={"heartbeat_interval": 60.0, "lease_ttl": 180})
    job_id = submit(
        slow_ticks,
        spec(
            entrypoint="tests.custom_trainers.probes:sleep_steps",
            training={"max_steps": 5, "epochs": 1},
        ),
    )
    started = time.monotonic()
    assert Supervisor(slow_ticks, IDENTITY, spare=forking).run(job_id) == Outcome.SUCCEEDED
    assert time.monotonic() - started < 30.0
    assert view(slow_ticks, job_id)["status"] == "succeeded"


def test_a_forked_trainer_s_exit_descriptor_is_readable_once_it_has_exited(
    forking: WarmSpare,
) -> None:
    trainer = forking.trainer
    assert trainer is not None
    forking.trainer = None  # this test's, not the next job's
    exited = trainer.exit_fd()
    assert exited is not None
    try:
        assert select.select([exited], [], [], 0)[0] == []  # a spare waits for its launch
        trainer.signal_group(signal.SIGKILL)
        assert select.select([exited], [], [], READY_S)[0] == [exited]
        assert trainer.poll() == -signal.SIGKILL
    finally:
        os.close(exited)
        trainer.close()


def test_forked_trainers_draw_fresh_randomness_as_spawned_ones_do(
    allowed: Settings, forking: WarmSpare
) -> None:
    # Given two jobs, neither seeding the global generators, in trainers forked from one zygote
    first = run_probe(allowed, forking)
    second = run_probe(allowed, forking)
    assert forking.zygote is not None
    assert first["ppid"] == second["ppid"] == forking.zygote.pid
    # Then Python's, numpy's and torch's generators are seeded afresh in each, as in a fresh
    # interpreter, not left in the zygote's state (a job's own seed still makes a run exact:
    # test_a_run_resumed_on_the_fork_path_ends_bit_identical_to_an_uninterrupted_one)
    assert first["random"] != second["random"]
    assert first["numpy_random"] != second["numpy_random"]
    assert first["torch_initial_seed"] != second["torch_initial_seed"]
