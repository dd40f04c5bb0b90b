"""The TensorFlow trainer as a real subprocess: trains, out-of-memory, exact resume."""

from __future__ import annotations

import signal
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.trainer_support import Trainer, launch, run_trainer, spec
from workers.trainers.protocol import EXIT_OK, EXIT_OOM, CheckpointSaved, Message

pytestmark = [
    pytest.mark.tensorflow,
    # Checked without importing it: only the trainer processes load tensorflow.
    pytest.mark.skipif(find_spec("tensorflow") is None, reason="needs tensorflow-cpu"),
]


def test_tensorflow_trains_and_resumes_bit_exactly(tmp_path: Path) -> None:
    # Given an uninterrupted run A (classification, to cover cross-entropy and accuracy too)
    model = {"input_dim": 16, "hidden_units": [32], "output_dim": 3, "task": "classification"}
    job = spec(framework="tensorflow", model=model)
    a = run_trainer(launch(tmp_path / "a", job), tmp_path / "a")
    assert a.code == EXIT_OK, a.stderr
    assert a.result.model_path.endswith("model-e1.weights.h5")
    assert a.result.metrics["accuracy"] > 0.5

    # When run B is SIGKILLed after its second checkpoint and resumed under the next lease
    def kill_after_second(message: Message, trainer: Trainer) -> None:
        if isinstance(message, CheckpointSaved) and message.step == 40:
            trainer.kill()

    slow = spec(framework="tensorflow", model=model, faults={"step_delay_s": 0.02})
    b1 = run_trainer(launch(tmp_path / "b", slow), tmp_path / "b", kill_after_second)
    assert b1.code == -signal.SIGKILL
    again = launch(tmp_path / "b", slow, epoch=2, attempt=2, resume_from=b1.newest_first())
    b2 = run_trainer(again, tmp_path / "b")

    # Then it resumes from step 40 and ends with the same weights, to the bit
    assert b2.code == EXIT_OK, b2.stderr
    assert [(r.step, Path(r.path).name) for r in b2.resumed] == [(40, "e1-s40")]
    assert b2.result.weights_sha256 == a.result.weights_sha256
    assert b2.result.final_loss == a.result.final_loss


def test_tensorflow_injected_oom_is_resource_exhausted(tmp_path: Path) -> None:
    job = spec(
        framework="tensorflow",
        training={"batch_size": 128, "max_steps": 4},
        faults={"oom_above_micro_batch": 32},
    )
    too_big = run_trainer(launch(tmp_path, job, micro_batch=64), tmp_path)
    assert too_big.code == EXIT_OOM
    assert too_big.failure.kind == "oom"
    assert too_big.failure.message.startswith("ResourceExhaustedError: OOM (injected")
    fits = run_trainer(launch(tmp_path, job, micro_batch=32, epoch=2), tmp_path)
    assert fits.code == EXIT_OK, fits.stderr
    assert "4 x micro-batch 32" in fits.stdout


def test_tensorflow_on_two_replicas_trains_like_one_and_resumes_bit_exactly(
    tmp_path: Path,
) -> None:
    # Given the same job on one device and on a gang of 2 (simulated: 2 logical CPU devices
    # under MirroredStrategy), batch 60 of 500 rows so the last batch (20 rows) and the
    # micro-batch of 16 cut the replicas' shards unevenly
    model = {"input_dim": 16, "hidden_units": [32], "output_dim": 3, "task": "classification"}
    training = {"batch_size": 60, "epochs": 2, "checkpoint_every_steps": 6}
    one = spec(framework="tensorflow", model=model, data={"samples": 500}, training=training)
    two = spec(
        framework="tensorflow",
        model=model,
        data={"samples": 500},
        training=training,
        resources={"gpu_count": 2},
    )
    single = run_trainer(launch(tmp_path / "one", one, micro_batch=16), tmp_path / "one")
    a = run_trainer(launch(tmp_path / "a", two, micro_batch=16), tmp_path / "a")
    assert single.code == EXIT_OK, single.stderr
    assert a.code == EXIT_OK, a.stderr
    assert "2 replicas (MirroredStrategy over" in a.stdout

    # Then the two replicas' loss is the one process's, up to float summation order
    assert a.result.final_loss == pytest.approx(single.result.final_loss, rel=1e-6)
    assert a.result.metrics["accuracy"] == pytest.approx(
        single.result.metrics["accuracy"], abs=0.01
    )

    # When a 2-replica run is SIGKILLed after its second checkpoint and resumed
    def kill_after_second(message: Message, trainer: Trainer) -> None:
        if isinstance(message, CheckpointSaved) and message.step == 12:
            trainer.kill()

    slow = spec(**{**two.model_dump(), "faults": {"step_delay_s": 0.05}})
    b1 = run_trainer(
        launch(tmp_path / "b", slow, micro_batch=16), tmp_path / "b", kill_after_second
    )
    assert b1.code == -signal.SIGKILL
    again = launch(
        tmp_path / "b", slow, epoch=2, attempt=2, micro_batch=16, resume_from=b1.newest_first()
    )
    b2 = run_trainer(again, tmp_path / "b")

    # Then it ends with the uninterrupted 2-replica run's weights, to the bit
    assert b2.code == EXIT_OK, b2.stderr
    assert [(r.step, Path(r.path).name) for r in b2.resumed] == [(12, "e1-s12")]
    assert b2.result.weights_sha256 == a.result.weights_sha256
    assert b2.result.final_loss == a.result.final_loss
