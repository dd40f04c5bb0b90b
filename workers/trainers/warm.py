"""A trainer started ahead of its job: ``python -m workers.trainers.warm FRAMEWORK``.

It imports the framework (and, on a GPU, creates the CUDA context on its device) while the
worker has no job for it, then waits for one line on stdin: the path of a launch file, which it
runs exactly as ``python -m workers.trainers.main LAUNCH`` would. End of file instead means
"not needed": it exits. So a job's trainer starts in milliseconds instead of the seconds that
importing torch takes, and everything else — the allow-listed environment, the process group,
the control pipe, dying with its supervisor — is as for a trainer started cold.

A spare forked by the fork server (``workers.trainers.zygote``) has the imports already and
starts at ``wait_and_run``.
"""

from __future__ import annotations

import importlib
import select
import sys

from workers.trainers.lifeline import bind_to_supervisor

#: what a spare imports ahead of time, per framework.
PRELOAD = {
    "torch": ("torch", "numpy", "workers.trainers.torch_mlp", "workers.trainers.main"),
    "tensorflow": ("tensorflow", "workers.trainers.tf_mlp", "workers.trainers.main"),
}


def import_framework(framework: str, *, warm_up: bool = True) -> None:
    """Import ``framework`` and the trainer modules; never touches CUDA (the zygote forks
    after this)."""
    for module in PRELOAD.get(framework, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return  # not installed here: the job will say so when it runs
    if framework == "torch" and warm_up:
        import torch

        # The first optimizer a process builds imports torch's compiler stack (~1.2 s of CPU
        # here): pay it now. No random numbers are drawn, so a job's seeded run is unchanged,
        # and the tensors are too small for a parallel kernel (no thread pool is started).
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([weight])
        torch.autograd.backward(weight.sum())
        optimizer.step()


def create_cuda_context(framework: str) -> None:
    """On a GPU, the CUDA context on this process's device (``CUDA_VISIBLE_DEVICES``)."""
    if framework == "torch" and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.init()  # type: ignore[no-untyped-call]


def wait_and_run(framework: str) -> int:
    """Create the CUDA context, wait for the launch line and run it (0 at end of file)."""
    create_cuda_context(framework)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    from workers.trainers import main as trainer_main

    return trainer_main.main([line.strip()])


def _launch_waiting() -> bool:
    """Whether the launch line (or end of file) is already there to read."""
    try:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)


def main(argv: list[str] | None = None) -> int:
    bind_to_supervisor()
    args = sys.argv[1:] if argv is None else argv
    framework = args[0] if args else ""
    # Skip the optimizer warm-up when the job is already waiting (a busy fleet: it would only
    # delay that job, which may never build an optimizer).
    import_framework(framework, warm_up=not _launch_waiting())
    return wait_and_run(framework)


if __name__ == "__main__":
    sys.exit(main())
