"""Trainers that look at the process they run in (the sandbox tests use them)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from workers.trainers.context import TrainContext
from workers.trainers.errors import StopRequested


def _result(ctx: TrainContext) -> dict[str, Any]:
    return {"final_loss": 0.0, "model_path": str(ctx.checkpoint_dir), "weights_sha256": "0" * 64}


def dump_environment(ctx: TrainContext) -> dict[str, Any]:
    """Print the names of every variable this process can read (to the job's log)."""
    print("ENVIRONMENT " + json.dumps(sorted(os.environ)), flush=True)
    return _result(ctx)


def spawn_and_wait(ctx: TrainContext) -> dict[str, Any]:
    """Start a child that would sleep for minutes, as a DataLoader worker would live on, then
    train until told to stop."""
    child = subprocess.Popen(["sleep", "300"])
    print(f"CHILD {child.pid}", flush=True)
    step = 0
    while not ctx.should_stop():
        step += 1
        ctx.report(step, 10_000, epoch=1, loss=1.0)
        time.sleep(0.1)
    raise StopRequested


def report_pid(ctx: TrainContext) -> dict[str, Any]:
    """Print which process ran the job, and whether torch was imported before the job began."""
    import sys

    print(f"PID {os.getpid()} TORCH_PRELOADED {'torch' in sys.modules}", flush=True)
    return _result(ctx)


def stamp(ctx: TrainContext) -> dict[str, Any]:
    """Print the wall-clock moment the trainer function was called (``bench/warm_start.py``)."""
    print(f"CALLED_AT {time.time():.6f}", flush=True)
    return _result(ctx)


def sleep_steps(ctx: TrainContext) -> dict[str, Any]:
    """A job that keeps its GPU for ``training.max_steps`` steps of 10 ms each and does nothing
    else (``bench/replay.py``: a trace's job durations, without the CPU cost of training).
    Prints the moment it was called; stops early, at a step, when asked to."""
    print(f"CALLED_AT {time.time():.6f}", flush=True)
    total = ctx.spec.training.max_steps or 1
    started = time.monotonic()
    for step in range(1, total + 1):
        if ctx.should_stop():
            raise StopRequested
        time.sleep(max(0.0, started + step * 0.01 - time.monotonic()))
        if step % 50 == 0 or step == total:
            ctx.report(step, total, epoch=1, loss=0.0)
    return _result(ctx)


def report_process(ctx: TrainContext) -> dict[str, Any]:
    """Print the process's pid, parent, whole environment and torch's thread count
    (``tests/integration/test_zygote.py``: a forked trainer is a spawned one's equal)."""
    import random
    import sys

    import numpy
    import torch

    facts = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "env": dict(os.environ),
        "threads": torch.get_num_threads(),
        "preloaded": "torch" in sys.modules,
        # unseeded draws from the global generators, as code that sets no seed would make them
        "random": random.random(),
        "numpy_random": float(numpy.random.random()),
        "torch_initial_seed": torch.initial_seed(),
    }
    print("PROCESS " + json.dumps(facts), flush=True)
    return _result(ctx)


def first_step_stamp(ctx: TrainContext) -> dict[str, Any]:
    """The built-in torch trainer, printing the wall-clock moment of its first step
    (``bench/warm_start.py``: progress reaches the database only with the next heartbeat)."""
    from workers.trainers import torch_mlp

    report = ctx.report
    stamped = False

    def stamping_report(*args: Any, **kwargs: Any) -> None:
        nonlocal stamped
        if not stamped:
            stamped = True
            print(f"FIRST_STEP_AT {time.time():.6f}", flush=True)
        report(*args, **kwargs)

    ctx.report = stamping_report  # type: ignore[method-assign]
    return dict(torch_mlp.train(ctx))
