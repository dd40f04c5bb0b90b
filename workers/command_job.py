"""A command job's run: the user's own program as the trainer process.

The program is started without a shell, in the attempt's working directory, in its own
process group, with the trainer's allow-listed environment plus the job's ``env`` and the
environment protocol below (the contract for user code; ``docs/api.md``):

===========================  =========================================================
variable                     value
===========================  =========================================================
``GPUFLEET_JOB_ID``          the job's id
``GPUFLEET_CHECKPOINT_DIR``  where checkpoints go (the SDK writes and records them)
``GPUFLEET_RESUME_FROM``     the newest recorded checkpoint, or empty: start from scratch
``GPUFLEET_OUTPUT_DIR``      what the job leaves here are its artifacts
``GPUFLEET_BATCH_SIZE``      rows per optimizer step (never changes for a job)
``GPUFLEET_MICRO_BATCH``     rows per forward/backward (halved after out-of-memory)
``GPUFLEET_ACCUMULATION``    forward/backward passes per optimizer step
``GPUFLEET_SEED``            ``training.seed``
===========================  =========================================================

``python`` on its ``PATH`` is the worker's interpreter (the one with the SDK, ``workers.sdk``,
and the frameworks). A program that uses the SDK speaks the trainer protocol like the built-ins
(progress, checkpoints, stop, exit codes). One that does not is still run: exit 0 is success;
another exit is classified from the last lines of its output by the one failure table
(``app.domain.failures``), so an out-of-memory message gets the micro-batch backoff; a killed
one starts again from scratch (it recorded no checkpoint to resume from).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

from app.domain.failures import FailureKind, classify
from app.domain.outcome import EXIT_INFRA, EXIT_OK, EXIT_OOM, EXIT_STOPPED, EXIT_USER_ERROR
from app.snapshots import UnsafeArchive, sha256_file, unpack
from app.storage import Store
from workers.gang import GangProcess
from workers.lease_writer import LeaseWriter
from workers.trainer_process import TrainerProcess
from workers.trainers.protocol import LAUNCH_ENV, Failure, Launch, Result
from workers.watch import TrainerRun, WatchSettings, watch

_EXIT_CODES: dict[FailureKind, int] = {
    "oom": EXIT_OOM,
    "infra": EXIT_INFRA,
    "user_error": EXIT_USER_ERROR,
}
#: exit codes that already say how the run ended (the SDK's, ``app.domain.outcome``).
_PROTOCOL_EXITS = frozenset({EXIT_OK, EXIT_STOPPED, *_EXIT_CODES.values()})


def environment(launch: Launch, launch_file: Path) -> dict[str, str]:
    """The job's ``env`` and the environment protocol (the module's table)."""
    spec = launch.spec
    resume = next((p for p in launch.resume_from if p.exists()), None)
    micro = min(launch.micro_batch, spec.training.batch_size)
    path = os.pathsep.join(
        p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p
    )
    return {
        **spec.env,
        "PATH": path,
        "GPUFLEET_JOB_ID": launch.job_id,
        "GPUFLEET_CHECKPOINT_DIR": str(launch.checkpoint_dir),
        "GPUFLEET_RESUME_FROM": str(resume or ""),
        "GPUFLEET_OUTPUT_DIR": str(launch.output_dir or ""),
        "GPUFLEET_BATCH_SIZE": str(spec.training.batch_size),
        "GPUFLEET_MICRO_BATCH": str(micro),
        "GPUFLEET_ACCUMULATION": str(-(-spec.training.batch_size // micro)),
        "GPUFLEET_SEED": str(spec.training.seed),
        LAUNCH_ENV: str(launch_file),
    }


def start(
    launch: Launch,
    launch_file: Path,
    workdir: Path,
    *,
    gang: list[str] | None = None,
    cuda: bool = False,
) -> TrainerProcess | GangProcess:
    """Start the command, or with ``gang`` (the gang's devices, the leader's first) one copy
    per device with torch.distributed's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``: what ``torchrun`` gives); OSError if it cannot be (not
    found, not executable)."""
    argv = launch.spec.command
    assert argv is not None
    env = environment(launch, launch_file)
    if gang is None:
        return TrainerProcess.command(argv, env=env, cwd=workdir)
    return GangProcess.start(
        gang,
        real_gpus=cuda,
        rank_process=lambda ranked: TrainerProcess.command(
            argv, env={**env, **ranked}, cwd=workdir
        ),
    )


class SnapshotMissing(Exception):
    """The job's snapshot is not in the store."""


def fetch_snapshot(store: Store, key: str, snapshot_id: str, workdir: Path) -> None:
    """Download the snapshot, check its sha256 and its members, unpack it into ``workdir``."""
    archive = workdir.parent / "snapshot.tar.gz"
    try:
        store.get_file(key, archive)
    except FileNotFoundError:
        raise SnapshotMissing(f"snapshot {snapshot_id} is not in the store") from None
    got = sha256_file(archive)
    if got != snapshot_id:
        raise OSError(f"snapshot {snapshot_id}: the download's sha256 is {got}")
    unpack(archive, workdir)
    archive.unlink()


def unpack_snapshot(snapshot: Callable[[Path], None], workdir: Path) -> TrainerRun | None:
    """Put the job's snapshot in ``workdir``; the failed run if it could not be."""
    try:
        snapshot(workdir)
    except SnapshotMissing as exc:
        return _failed("user_error", str(exc))
    except UnsafeArchive as exc:
        return _failed("user_error", f"snapshot refused: {exc}")
    except OSError as exc:  # the store, the disk, or a download that does not match
        return _failed("infra", f"could not fetch the snapshot: {exc}")
    return None


def not_started(argv0: str, exc: OSError) -> TrainerRun:
    """The run of a command that could not be started: the user's error."""
    return _failed("user_error", f"cannot run the command {argv0!r}: {exc.strerror or exc}")


def _failed(kind: FailureKind, message: str) -> TrainerRun:
    return TrainerRun(
        exit_code=_EXIT_CODES[kind],
        result=None,
        failure=Failure(kind=kind, message=message),
        stop=None,
    )


def settle(run: TrainerRun, output_dir: Path | None) -> TrainerRun:
    """A command's run in the trainer protocol's terms: exit 0 is a result; an exit the
    protocol does not know is classified from the output's last lines."""
    code = run.exit_code
    if run.result is not None or run.failure is not None or code is None:
        return run
    if code == EXIT_OK:
        result = Result(final_loss=None, model_path=str(output_dir or ""), weights_sha256="")
        return dataclasses.replace(run, result=result)
    if code < 0 or code in _PROTOCOL_EXITS:  # killed by a signal, or the SDK's own exit
        return run
    found = classify(stderr_tail=run.output_tail)
    last = next((ln for ln in reversed(run.output_tail.splitlines()) if ln.strip()), "")
    message = f"the command exited with code {code}: {last.strip()}"[:4000]
    failure = Failure(kind=found.kind, message=message, device_suspect=found.device_suspect)
    return dataclasses.replace(run, exit_code=_EXIT_CODES[found.kind], failure=failure)


def run(
    launch_file: Path,
    workdir: Path,
    writer: LeaseWriter,
    cfg: WatchSettings,
    snapshot: Callable[[Path], None] | None = None,
    *,
    gang: list[str] | None = None,
    cuda: bool = False,
) -> TrainerRun:
    """Start the command of ``launch_file`` in ``workdir`` (the job's snapshot unpacked there by
    ``snapshot(workdir)``, if it has one), once per device of its ``gang`` if it has several,
    and watch it to its end."""
    launch = Launch.load(launch_file)
    assert launch.spec.command is not None
    workdir.mkdir(parents=True, exist_ok=True)
    if launch.output_dir is not None:
        launch.output_dir.mkdir(parents=True, exist_ok=True)
    if snapshot is not None and (refused := unpack_snapshot(snapshot, workdir)) is not None:
        return refused
    try:
        trainer = start(launch, launch_file, workdir, gang=gang, cuda=cuda)
    except OSError as exc:
        return not_started(launch.spec.command[0], exc)
    return settle(watch(trainer, writer, cfg), launch.output_dir)
