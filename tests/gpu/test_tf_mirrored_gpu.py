"""The TensorFlow trainer on 2 real GPUs: one process, a MirroredStrategy replica per GPU.

Skipped unless TensorFlow itself sees 2 GPUs (a GPU build of TensorFlow, not the
``tensorflow-cpu`` wheel the CPU suite installs); checked in a subprocess, as only trainer
processes load TensorFlow. Run on such a machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.trainer_support import Trainer, launch, run_trainer, spec
from workers.trainers.protocol import EXIT_OK, CheckpointSaved, Launch, Message


def _tensorflow_gpus() -> int:
    if find_spec("tensorflow") is None:
        return 0
    probe = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.tensorflow,
    pytest.mark.skipif(_tensorflow_gpus() < 2, reason="needs TensorFlow that sees 2 GPUs"),
]

MODEL = {"input_dim": 256, "hidden_units": [1024], "output_dim": 4, "task": "classification"}
TRAINING = {"batch_size": 512, "epochs": 2, "checkpoint_every_steps": 8}


def test_two_gpu_replicas_train_like_one_gpu_and_resume_bit_exactly(tmp_path: Path) -> None:
    one = spec(framework="tensorflow", model=MODEL, data={"samples": 8192}, training=TRAINING)
    two = spec(
        framework="tensorflow",
        model=MODEL,
        data={"samples": 8192},
        training=TRAINING,
        resources={"gpu_count": 2},
    )

    def on_cuda(job_launch: Launch) -> Launch:
        return job_launch.model_copy(update={"device": "cuda"})

    single = run_trainer(on_cuda(launch(tmp_path / "one", one)), tmp_path / "one")
    a = run_trainer(on_cuda(launch(tmp_path / "a", two)), tmp_path / "a")
    assert single.code == EXIT_OK, single.stderr
    assert a.code == EXIT_OK, a.stderr
    assert "tensorflow mlp on gpu" in a.stdout and "2 replicas (MirroredStrategy over" in a.stdout
    assert "GPU:1" in a.stdout, a.stdout
    assert a.result.final_loss == pytest.approx(single.result.final_loss, rel=1e-3)

    def kill_after_second(message: Message, trainer: Trainer) -> None:
        if isinstance(message, CheckpointSaved) and message.step == 16:
            trainer.kill()

    b1 = run_trainer(on_cuda(launch(tmp_path / "b", two)), tmp_path / "b", kill_after_second)
    assert b1.code == -signal.SIGKILL
    again = launch(tmp_path / "b", two, epoch=2, attempt=2, resume_from=b1.newest_first())
    b2 = run_trainer(on_cuda(again), tmp_path / "b")
    assert b2.code == EXIT_OK, b2.stderr
    assert [r.step for r in b2.resumed] == [16]
    assert b2.result.weights_sha256 == a.result.weights_sha256
