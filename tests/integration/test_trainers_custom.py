"""Custom entrypoints: the example in tests.custom_trainers.toy, and the allow-list."""

from __future__ import annotations

import signal
from pathlib import Path

from app.domain.spec import JobSpec
from tests.trainer_support import Trainer, launch, run_trainer, spec
from workers.trainers.protocol import EXIT_OK, EXIT_USER_ERROR, CheckpointSaved, Message

ALLOWED = ("tests.custom_trainers",)


def toy(**overrides: object) -> JobSpec:
    return spec(
        framework=None,
        entrypoint="tests.custom_trainers.toy:train",
        training={"max_steps": 60, "checkpoint_every_steps": 10, "batch_size": 32},
        data={"samples": 500},
        **overrides,
    )


def test_custom_entrypoint_trains_and_resumes_exactly(tmp_path: Path) -> None:
    a = run_trainer(launch(tmp_path / "a", toy(), entrypoint_prefixes=ALLOWED), tmp_path / "a")
    assert a.code == EXIT_OK, a.stderr
    assert [c.step for c in a.checkpoints] == [10, 20, 30, 40, 50, 60]

    def kill_after_second(message: Message, trainer: Trainer) -> None:
        if isinstance(message, CheckpointSaved) and message.step == 20:
            trainer.kill()

    slow = toy(faults={"step_delay_s": 0.02})
    b1 = run_trainer(
        launch(tmp_path / "b", slow, entrypoint_prefixes=ALLOWED), tmp_path / "b", kill_after_second
    )
    assert b1.code == -signal.SIGKILL
    b2 = run_trainer(
        launch(
            tmp_path / "b",
            slow,
            epoch=2,
            attempt=2,
            resume_from=b1.newest_first(),
            entrypoint_prefixes=ALLOWED,
        ),
        tmp_path / "b",
    )
    assert b2.code == EXIT_OK, b2.stderr
    assert [r.step for r in b2.resumed] == [20]
    assert b2.result.weights_sha256 == a.result.weights_sha256


def test_entrypoint_outside_the_allowed_prefixes_is_a_user_error(tmp_path: Path) -> None:
    job = spec(framework=None, entrypoint="os:getcwd")
    out = run_trainer(launch(tmp_path, job, entrypoint_prefixes=ALLOWED), tmp_path)
    assert out.code == EXIT_USER_ERROR
    assert out.failure.kind == "user_error"
    assert "not under an allowed prefix" in out.failure.message


def test_missing_entrypoint_module_or_function_is_a_user_error(tmp_path: Path) -> None:
    for n, entrypoint in enumerate(
        ["tests.custom_trainers.nope:train", "tests.custom_trainers.toy:nope"], start=1
    ):
        job = spec(framework=None, entrypoint=entrypoint)
        out = run_trainer(launch(tmp_path, job, epoch=n, entrypoint_prefixes=ALLOWED), tmp_path)
        assert out.code == EXIT_USER_ERROR
        assert out.failure.kind == "user_error"
        assert "cannot load entrypoint" in out.failure.message
