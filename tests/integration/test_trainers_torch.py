"""The PyTorch trainer as a real subprocess: exact resume, accumulation, faults, stop, data files.

Each test runs ``python -m workers.trainers.main`` the way the supervisor does (see
``tests/trainer_support.py``) on a small MLP, and reads the messages and the exit code.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from app.domain.spec import JobSpec
from tests.trainer_support import Outcome, Trainer, launch, run_trainer, spec
from workers.trainers.protocol import (
    EXIT_INFRA,
    EXIT_OK,
    EXIT_OOM,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    CheckpointSaved,
    Failure,
    Message,
    Progress,
    Result,
)

#: Relative tolerance for the final loss at micro-batch 64 vs 256 (batch 256, 200 Adam steps at
#: lr 1e-3). The gradients are equal up to float32 summation order, and at this learning rate the
#: runs stay within rounding of each other: measured ~4e-8 relative (losses ~1e-8 per step,
#: weights within 6e-8). At lr 1e-2, Adam oscillating near the minimum amplifies the same
#: rounding to ~6e-5 on the last epoch's mean loss (up to 3e-3 on single steps): the trajectories
#: part like any chaotic system's, not because the gradients differ.
MICRO_BATCH_RTOL = 1e-4


def kill_after_checkpoints(count: int):  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def on_message(message: Message, trainer: Trainer) -> None:
        if isinstance(message, CheckpointSaved):
            seen.append(message.step)
            if len(seen) == count:
                trainer.kill()

    return on_message


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """One uninterrupted run of ``spec()``, computed once for the tests that compare with it
    (they only read it: a test that changes its checkpoints works on copies)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = run_trainer(launch(workdir, spec()), workdir)
    assert out.code == EXIT_OK, out.stderr
    return out


def test_resume_after_sigkill_ends_with_the_same_weights(
    tmp_path: Path, uninterrupted: Outcome
) -> None:
    # Given an uninterrupted run A
    a = uninterrupted
    # When run B is killed (SIGKILL) right after its second checkpoint
    slow = spec(faults={"step_delay_s": 0.02})
    b1 = run_trainer(launch(tmp_path / "b", slow), tmp_path / "b", kill_after_checkpoints(2))
    assert b1.code == -signal.SIGKILL
    assert [c.step for c in b1.checkpoints] == [20, 40]
    # and resumed under the next lease from its checkpoints, newest first
    again = launch(tmp_path / "b", slow, epoch=2, attempt=2, resume_from=b1.newest_first())
    b2 = run_trainer(again, tmp_path / "b")
    # Then it continues from step 40 and ends bit-identical to A
    assert b2.code == EXIT_OK, b2.stderr
    assert [(r.step, Path(r.path).name) for r in b2.resumed] == [(40, "e1-s40.pt")]
    assert [Path(c.path).name for c in b2.checkpoints] == ["e2-s60.pt", "e2-s80.pt"]
    assert b2.result.weights_sha256 == a.result.weights_sha256
    assert b2.result.final_loss == a.result.final_loss
    assert b2.result.model_path.endswith("model-e2.pt")


def test_micro_batch_does_not_change_training(tmp_path: Path) -> None:
    # Given batch 256 over 200 optimizer steps
    job = spec(
        training={
            "batch_size": 256,
            "epochs": 25,
            "learning_rate": 0.001,
            "checkpoint_every_steps": 1000,
        }
    )
    # When it runs with micro-batch 256 (one pass) and 64 (four accumulated passes)
    whole = run_trainer(launch(tmp_path / "256", job, micro_batch=256), tmp_path / "256")
    split = run_trainer(launch(tmp_path / "64", job, micro_batch=64), tmp_path / "64")
    # Then the final losses agree up to float summation order
    assert whole.code == split.code == EXIT_OK, split.stderr
    assert whole.result.metrics["steps"] == split.result.metrics["steps"] == 200
    a, b = whole.result.final_loss, split.result.final_loss
    assert a is not None and b is not None
    print(f"final loss micro 256: {a!r}, micro 64: {b!r}, relative difference {abs(a - b) / a:.3e}")
    assert b == pytest.approx(a, rel=MICRO_BATCH_RTOL)
    assert "4 x micro-batch 64" in split.stdout


def test_injected_oom_exits_oom_and_a_smaller_micro_batch_fits(tmp_path: Path) -> None:
    job = spec(training={"batch_size": 256, "max_steps": 5}, faults={"oom_above_micro_batch": 64})
    too_big = run_trainer(launch(tmp_path, job, micro_batch=256), tmp_path)
    assert too_big.code == EXIT_OOM
    assert too_big.failure.kind == "oom"
    assert too_big.failure.message.startswith("OutOfMemoryError: CUDA out of memory")
    fits = run_trainer(launch(tmp_path, job, micro_batch=64, epoch=2), tmp_path)
    assert fits.code == EXIT_OK, fits.stderr
    assert fits.result.metrics["steps"] == 5


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_one_before(
    tmp_path: Path, uninterrupted: Outcome
) -> None:
    # Given a finished run whose newest checkpoint (step 80) is then truncated (in a copy)
    first = uninterrupted
    (tmp_path / "recorded").mkdir()
    newest, *older = [
        Path(shutil.copy(path, tmp_path / "recorded" / path.name)) for path in first.newest_first()
    ]
    newest.write_bytes(newest.read_bytes()[:100])
    # When a new lease resumes from the recorded checkpoints
    again = run_trainer(
        launch(tmp_path, spec(), epoch=2, attempt=2, resume_from=[newest, *older]), tmp_path
    )
    # Then it says it skipped the corrupt one, resumes from step 60, and finishes the same
    assert again.code == EXIT_OK, again.stderr
    assert [Path(s.path).name for s in again.skipped] == ["e1-s80.pt"]
    assert again.skipped[0].reason
    assert [(r.step, Path(r.path).name) for r in again.resumed] == [(60, "e1-s60.pt")]
    assert again.result.weights_sha256 == first.result.weights_sha256


def test_value_error_in_a_step_is_a_user_error(tmp_path: Path) -> None:
    job = spec(faults={"fail_at_step": 10, "fail_with": "value_error"})
    out = run_trainer(launch(tmp_path, job), tmp_path)
    assert out.code == EXIT_USER_ERROR
    assert out.failure.kind == "user_error"
    assert out.failure.message == "ValueError: injected error at step 10"
    assert "Traceback" in out.stderr
    assert max(p.step for p in out.of(Progress)) <= 9


def test_transient_fault_fails_the_first_attempt_only(tmp_path: Path) -> None:
    job = spec(faults={"fail_at_step": 10, "fail_with": "transient"})
    first = run_trainer(launch(tmp_path, job, attempt=1), tmp_path)
    assert first.code == EXIT_INFRA
    assert first.failure.kind == "infra"
    assert "InjectedTransientError" in first.failure.message
    second = run_trainer(launch(tmp_path, job, attempt=2, epoch=2), tmp_path)
    assert second.code == EXIT_OK, second.stderr


@pytest.mark.parametrize("how", ["stdin", "sigterm", "stdin_closed"])
def test_stop_request_saves_a_checkpoint_and_exits_stopped(tmp_path: Path, how: str) -> None:
    job = spec(faults={"step_delay_s": 0.02})

    asked: list[int] = []

    def stop_at_first_progress(message: Message, trainer: Trainer) -> None:
        if isinstance(message, Progress) and not asked:
            asked.append(message.step)
            if how == "stdin":
                trainer.stop()
            elif how == "sigterm":
                trainer.proc.send_signal(signal.SIGTERM)
            else:  # the supervisor died: its end of the stdin pipe closed
                assert trainer.proc.stdin is not None
                trainer.proc.stdin.close()

    trainer = Trainer(launch(tmp_path, job), tmp_path)
    out = trainer.collect(stop_at_first_progress)
    assert out.code == EXIT_STOPPED, out.stderr
    assert not out.of(Result) and not out.of(Failure)
    assert len(out.checkpoints) == 1
    saved = out.checkpoints[0]
    assert asked[0] <= saved.step < 20  # the stop checkpoint, not a periodic one
    assert Path(saved.path).is_file()
    # and a new lease resumes from it
    resumed = run_trainer(
        launch(tmp_path, spec(), epoch=2, resume_from=[Path(saved.path)]), tmp_path
    )
    assert resumed.code == EXIT_OK
    assert resumed.resumed[0].step == saved.step


def _write_npz(path: Path, rows: int = 300, dim: int = 16) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=x.sum(axis=1))


def _file_spec(relative: str, **overrides: object) -> JobSpec:
    return spec(
        data={"source": "file", "path": relative, "samples": 1},
        training={"max_steps": 8},
        **overrides,
    )


def test_npz_and_csv_files_under_the_data_root(tmp_path: Path) -> None:
    _write_npz(tmp_path / "data" / "sets" / "train.npz")
    npz = run_trainer(launch(tmp_path, _file_spec("sets/train.npz")), tmp_path)
    assert npz.code == EXIT_OK, npz.stderr
    assert "300 rows" in npz.stdout

    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 4))
    labels = (x[:, 0] > 0).astype(int)
    lines = ["a,b,c,d,label"] + [
        ",".join(f"{v:.5f}" for v in row) + f",{label}"
        for row, label in zip(x, labels, strict=True)
    ]
    (tmp_path / "data" / "cls.csv").write_text("\n".join(lines) + "\n")
    model = {"input_dim": 4, "hidden_units": [8], "output_dim": 2, "task": "classification"}
    csv = run_trainer(launch(tmp_path, _file_spec("cls.csv", model=model), epoch=2), tmp_path)
    assert csv.code == EXIT_OK, csv.stderr
    assert "200 rows" in csv.stdout
    assert 0.0 <= csv.result.metrics["accuracy"] <= 1.0


def test_data_paths_out_of_the_data_root_are_user_errors(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "secret.npz"
    _write_npz(outside)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.npz").symlink_to(outside)
    link = run_trainer(launch(tmp_path, _file_spec("link.npz")), tmp_path)
    assert link.code == EXIT_USER_ERROR
    assert link.failure.kind == "user_error"
    assert "leaves the data root" in link.failure.message

    # A '../' path never passes the spec; a launch carrying one anyway is refused as well.
    escape = launch(tmp_path, _file_spec("link.npz"), epoch=2)
    raw = json.loads(escape.model_dump_json())
    raw["spec"]["data"]["path"] = "../outside/secret.npz"
    out = Trainer(escape, tmp_path / "escape", raw_json=json.dumps(raw)).collect()
    assert out.code == EXIT_USER_ERROR
    assert out.failure.kind == "user_error"
    assert "without '..'" in out.failure.message

    missing = run_trainer(launch(tmp_path, _file_spec("nope.npz"), epoch=3), tmp_path)
    assert missing.code == EXIT_USER_ERROR
    assert "not found" in missing.failure.message
