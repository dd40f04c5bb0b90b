"""A trainer started ahead of its job: ``python -m workers.trainers.warm FRAMEWORK``.

It imports the framework (and, on a GPU, creates the CUDA context on its device) while the
worker has no job for it, then waits for one line on stdin: the path of a launch file, which it
runs exactly as ``python -m workers.trainers.main LAUNCH`` would. End of file instead means
"not needed": it exits. So a job's trainer starts in milliseconds instead of the seconds that
importing torch takes, and everything else — the allow-listed environment, the process group,
the control pipe, dying with its supervisor — is as for a trainer started cold.
"""

from __future__ import annotations

import importlib
import select
import sys

from workers.trainers.lifeline import bind_to_supervisor

#: what a spare imports ahead of time, per framework.
PRELOAD = {
    "torch": ("torch", "workers.trainers.torch_mlp"),
    "tensorflow": ("tensorflow", "workers.trainers.tf_mlp"),
}


def _preload(framework: str) -> None:
    for module in PRELOAD.get(framework, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return  # not installed here: the job will say so when it runs
    if framework == "torch" and not _launch_waiting():
        import torch

        # The first optimizer a process builds imports torch's compiler stack (~1.2 s of CPU
        # here): pay it now, unless the job is already waiting (a busy fleet: it would only
        # delay that job, which may never build an optimizer). No random numbers are drawn, so a
        # job's seeded run is unchanged.
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([weight])
        torch.autograd.backward(weight.sum())
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.init()  # type: ignore[no-untyped-call]


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
    _preload(args[0] if args else "")
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    from workers.trainers import main as trainer_main

    return trainer_main.main([line.strip()])


if __name__ == "__main__":
    sys.exit(main())
