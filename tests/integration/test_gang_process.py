"""A gang's ranks as one trainer (``workers.gang.GangProcess``), on real processes: small
Python programs that behave like ranks (write control messages and output, exit with a
trainer's codes), so that each test takes a second."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from workers.gang import GangProcess, leader_first
from workers.trainer_process import TrainerProcess
from workers.trainers import protocol

#: a rank that writes ``MESSAGES[rank]`` to its control pipe, a line of output, sleeps
#: ``SLEEP[rank]`` seconds, then exits with ``CODES[rank]`` (a negative one: killed by that
#: signal, as a crash would).
RANK_PROGRAM = """
import os, sys, time
from workers.trainers import protocol
rank = int(os.environ["RANK"])
fd = int(os.environ[protocol.CONTROL_FD_ENV])
for line in {messages!r}[rank]:
    os.write(fd, line.encode() + b"\\n")
print(f"hello from {{rank}} of {{os.environ['WORLD_SIZE']}}", flush=True)
time.sleep({sleeps!r}[rank])
code = {codes!r}[rank]
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def _failure(kind: str, message: str) -> str:
    return protocol.encode(protocol.Failure(kind=kind, message=message)).decode().strip()  # type: ignore[arg-type]


def _progress(step: int) -> str:
    return protocol.encode(protocol.Progress(step=step, total_steps=10, epoch=1)).decode().strip()


def _gang(
    messages: list[list[str]], sleeps: list[float], codes: list[int], tmp_path: Path
) -> GangProcess:
    program = RANK_PROGRAM.format(messages=messages, sleeps=sleeps, codes=codes)
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def spawn(rank_env: dict[str, str]) -> TrainerProcess:
        return TrainerProcess([sys.executable, "-c", program], declared={**env, **rank_env})

    return GangProcess.start(
        [f"sim-{r}" for r in range(len(codes))], real_gpus=False, rank_process=spawn
    )


def _drain(gang: GangProcess, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Read both merged streams to their end; returns (exit code, control, output)."""
    control, output = b"", b""
    deadline = time.monotonic() + timeout
    for stream in (gang.control, gang.output):
        while time.monotonic() < deadline:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            if stream is gang.control:
                control += chunk
            else:
                output += chunk
    while gang.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = gang.kill()
    gang.close()
    return code, control, output


def test_the_first_failed_rank_stops_every_rank_and_names_the_attempts_end(tmp_path: Path) -> None:
    # Given 3 ranks: rank 1 runs out of memory; ranks 0 and 2 would run for a minute, and rank 2
    # fails too once its peer is gone
    started = time.monotonic()
    gang = _gang(
        messages=[[_progress(1)], [_failure("oom", "CUDA out of memory")], []],
        sleeps=[60, 0.2, 60],
        codes=[0, protocol.EXIT_OOM, protocol.EXIT_INFRA],
        tmp_path=tmp_path,
    )
    code, control, output = _drain(gang)
    # Then all stopped within seconds, not a minute, and the gang's code is rank 1's
    assert time.monotonic() - started < 20
    assert code == protocol.EXIT_OOM
    assert all(rank.poll() is not None for rank in gang.ranks)
    # And the supervisor reads rank 0's progress and rank 1's failure, nothing else
    # (in either order: the ranks run side by side)
    messages = [protocol.decode(line) for line in control.splitlines()]
    assert sorted(type(m).__name__ for m in messages) == ["Failure", "Progress"]
    (failure,) = [m for m in messages if isinstance(m, protocol.Failure)]
    assert failure.kind == "oom"
    # And every rank's output reached the log, each line naming its rank
    for rank in range(3):
        assert f"[rank {rank}] hello from {rank} of 3".encode() in output


def test_ranks_that_all_finish_end_with_rank_0s_code_and_messages(tmp_path: Path) -> None:
    result = protocol.encode(
        protocol.Result(final_loss=0.5, model_path="/m", weights_sha256="ab")
    ).decode()
    gang = _gang(
        messages=[[_progress(10), result.strip()], [_progress(10), result.strip()]],
        sleeps=[0.3, 0.1],
        codes=[0, 0],
        tmp_path=tmp_path,
    )
    code, control, _ = _drain(gang)
    assert code == 0
    # Only rank 0's messages: one progress and one result, not two of each
    kinds = [type(protocol.decode(line)).__name__ for line in control.splitlines()]
    assert kinds == ["Progress", "Result"]


def test_a_rank_that_crashes_in_teardown_after_its_result_has_finished(tmp_path: Path) -> None:
    # Given rank 1 sends its result, then dies of SIGABRT at exit (gloo's threads at interpreter
    # exit: "terminate called without an active exception"), while rank 0 still writes its
    # model (1.5 s) before its result
    result = protocol.encode(
        protocol.Result(final_loss=0.5, model_path="/m", weights_sha256="ab")
    ).decode()
    gang = _gang(
        messages=[[result.strip()], [result.strip()]],
        sleeps=[1.5, 0.0],
        codes=[0, -signal.SIGABRT],
        tmp_path=tmp_path,
    )
    started = time.monotonic()
    code, control, _ = _drain(gang)
    # Then rank 0 was not killed: it ran to its end, and the gang ends with its result
    assert code == 0
    assert gang.ranks[0].poll() == 0 and gang.ranks[1].poll() == -signal.SIGABRT
    assert time.monotonic() - started >= 1.0
    assert [type(protocol.decode(line)).__name__ for line in control.splitlines()] == ["Result"]


def test_a_rank_that_crashes_before_its_result_stops_the_gang(tmp_path: Path) -> None:
    # Given rank 1 dies of SIGABRT before it sent a result, while rank 0 would run for a minute
    gang = _gang(messages=[[], []], sleeps=[60, 0.0], codes=[0, -signal.SIGABRT], tmp_path=tmp_path)
    started = time.monotonic()
    code, _, _ = _drain(gang)
    # Then the gang ends at once with the crash
    assert code == -signal.SIGABRT
    assert time.monotonic() - started < 20


def test_a_stopped_rank_waits_for_the_others_to_finish_their_checkpoint(tmp_path: Path) -> None:
    # Given rank 1 stops at once on request while rank 0 still writes its checkpoint (1.5 s)
    gang = _gang(
        messages=[[], []],
        sleeps=[1.5, 0.0],
        codes=[protocol.EXIT_STOPPED, protocol.EXIT_STOPPED],
        tmp_path=tmp_path,
    )
    started = time.monotonic()
    code, _, _ = _drain(gang)
    # Then rank 0 was not killed: it ran its 1.5 s and exited as stopped
    assert code == protocol.EXIT_STOPPED
    assert gang.ranks[0].poll() == protocol.EXIT_STOPPED
    assert time.monotonic() - started >= 1.0


def test_the_leaders_device_is_rank_0() -> None:
    assert leader_first(["GPU-0", "GPU-1", "GPU-2"], "GPU-2") == ["GPU-2", "GPU-0", "GPU-1"]
    assert leader_first(["GPU-0", "GPU-1"], None) == ["GPU-0", "GPU-1"]
