"""The trainer process: ``python -m workers.trainers.main LAUNCH.json`` (see ``protocol``).

It loads the launch, opens the control fd, listens for stop requests, picks the trainer (the
built-in torch or tensorflow MLP, or the spec's custom entrypoint), runs it, and turns how it
ended into one last message and an exit code:

=============================================  =================================  ================
how it ended                                   message                            exit code
=============================================  =================================  ================
returned a result                              ``result``                         EXIT_OK
``StopRequested`` (checkpoint saved)           none                               EXIT_STOPPED
out of memory (torch/tf OOM, MemoryError)      ``failure`` kind ``oom``           EXIT_OOM
GPU/driver fault (Xid, ECC, lost GPU, NCCL)    ``failure`` kind ``infra``,        EXIT_INFRA
                                               ``device_suspect``
``OSError`` (I/O, injected transient)          ``failure`` kind ``infra``         EXIT_INFRA
anything else (bad spec, data, user code)      ``failure`` kind ``user_error``    EXIT_USER_ERROR
=============================================  =================================  ================

The class comes from the one table of failure patterns, ``app.domain.failures``. A failure's
traceback goes to stderr: the job's log. A framework that is not installed on this worker is a
user error (the spec asks for what this fleet does not have).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.domain.failures import FailureKind, classify_exception
from app.domain.spec import check_policy
from workers.trainers.context import TrainContext
from workers.trainers.control import ControlChannel, StopFlag
from workers.trainers.errors import StopRequested, UserError
from workers.trainers.lifeline import bind_to_supervisor
from workers.trainers.protocol import (
    EXIT_INFRA,
    EXIT_OK,
    EXIT_OOM,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    Failure,
    Launch,
    Result,
)

Trainer = Callable[[TrainContext], Mapping[str, Any]]
_EXIT_CODES: dict[FailureKind, int] = {
    "oom": EXIT_OOM,
    "infra": EXIT_INFRA,
    "user_error": EXIT_USER_ERROR,
}


def resolve_trainer(launch: Launch) -> Trainer:
    spec = launch.spec
    if spec.entrypoint is not None:
        return _import_entrypoint(spec.entrypoint, launch)
    try:
        if spec.framework == "tensorflow":
            from workers.trainers import tf_mlp

            return tf_mlp.train
        from workers.trainers import torch_mlp

        return torch_mlp.train
    except ImportError as exc:
        raise UserError(
            f"framework {spec.framework!r} is not installed on this worker: {exc}"
        ) from exc


def _import_entrypoint(entrypoint: str, launch: Launch) -> Trainer:
    # The same rule the API applied at submit, checked again where the code is imported.
    # Faults are left to Faults.for_launch (ignored, not refused, without fault injection).
    try:
        check_policy(
            launch.spec,
            entrypoint_prefixes=launch.entrypoint_prefixes,
            fault_injection=True,
            command_jobs=True,  # the supervisor refuses user code where it is off
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    module_name, _, function_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"cannot load entrypoint {entrypoint!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(function):
        raise UserError(f"entrypoint {entrypoint!r} is not a function")
    trainer: Trainer = function
    return trainer


def classify(exc: BaseException) -> FailureKind:
    """The failure kind of an exception that ended a trainer (``app.domain.failures``)."""
    return classify_exception(exc).kind


def failure_message(exc: BaseException, *, prefix: str = "") -> tuple[Failure, int]:
    """The last message a failed trainer sends, and its exit code."""
    found = classify_exception(exc)
    failure = Failure(
        kind=found.kind,
        message=f"{prefix}{type(exc).__name__}: {exc}"[:4000],
        device_suspect=found.device_suspect,
    )
    return failure, _EXIT_CODES[found.kind]


def _result(outcome: Mapping[str, Any]) -> Result:
    if not isinstance(outcome, Mapping):
        raise TypeError(f"a trainer must return a dict, not {type(outcome).__name__}")
    fields = ("final_loss", "model_path", "weights_sha256", "metrics")
    return Result.model_validate({k: outcome[k] for k in fields if k in outcome})


def _settle(ctx: TrainContext) -> None:
    """On the way out: let the checkpoint in flight land (it is valid), send the last progress."""
    try:
        ctx.wait_checkpoints()
    except Exception:
        traceback.print_exc(file=sys.stderr)
    ctx.flush()


def run(launch: Launch, channel: ControlChannel, stop: StopFlag) -> int:
    ctx = TrainContext(launch, channel, stop)
    return execute(ctx, channel, stop, lambda: resolve_trainer(launch)(ctx))


def execute(
    ctx: TrainContext, channel: ControlChannel, stop: StopFlag, train: Callable[[], Any]
) -> int:
    """Run ``train()`` and turn how it ended into the last message and the exit code (the
    module's table). Shared with the SDK (``workers.sdk``), so command jobs end the same way."""
    try:
        result = _result(train())
        ctx.wait_checkpoints()
    except StopRequested:
        _settle(ctx)
        ctx.log(f"stopped ({stop.reason or 'on request'})")
        return EXIT_STOPPED
    except BaseException as exc:  # every ending (SystemExit from user code too) gets a message
        failure, code = failure_message(exc)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        _settle(ctx)
        channel.send(failure)
        return code
    ctx.flush()
    channel.send(result)
    ctx.log(f"finished: final loss {result.final_loss}, weights {result.weights_sha256[:12]}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    bind_to_supervisor()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.trainers.main LAUNCH.json", file=sys.stderr)
        return 2
    channel = ControlChannel.from_env()
    stop = StopFlag()
    stop.install()
    try:
        launch = Launch.load(Path(args[0]))
    except Exception as exc:  # unreadable: infra; a spec this worker refuses: user error
        traceback.print_exc(file=sys.stderr)
        failure, code = failure_message(exc, prefix="bad launch: ")
        channel.send(failure)
        return code
    return run(launch, channel, stop)


if __name__ == "__main__":
    sys.exit(main())
