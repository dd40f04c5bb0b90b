"""The trainer's parts in-process: TrainContext, checkpoint files, faults, data, classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from app.domain.spec import ModelSpec
from tests.trainer_support import launch, spec
from workers.trainers import checkpoints
from workers.trainers.context import TrainContext
from workers.trainers.data import load_file, resolve_data_path, synthetic
from workers.trainers.errors import InjectedTransientError, UserError
from workers.trainers.main import classify
from workers.trainers.protocol import (
    CheckpointSaved,
    CheckpointSkipped,
    Launch,
    Progress,
    Resumed,
)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[BaseModel] = []

    def send(self, message: BaseModel) -> None:
        self.sent.append(message)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def context(the_launch: Launch) -> tuple[TrainContext, Recorder, Clock]:
    channel, clock = Recorder(), Clock()
    return TrainContext(the_launch, channel, clock=clock), channel, clock


def test_report_is_throttled_and_never_loses_the_last_step(tmp_path: Path) -> None:
    ctx, channel, clock = context(launch(tmp_path, spec()))
    for step in range(1, 11):  # ten steps in the same instant
        ctx.report(step, 20, epoch=1, loss=1.0)
    assert [m.step for m in channel.sent if isinstance(m, Progress)] == [1]
    clock.now += 0.6
    ctx.report(11, 20, epoch=1)
    ctx.report(12, 20, epoch=1)
    ctx.flush()  # what main does before the result
    assert [m.step for m in channel.sent if isinstance(m, Progress)] == [1, 11, 12]
    ctx.report(20, 20, epoch=1)  # the final step goes at once
    assert channel.sent[-1] == Progress(epoch=1, step=20, total_steps=20)


def test_micro_batch_and_accumulation(tmp_path: Path) -> None:
    job = spec(training={"batch_size": 100})
    ctx, _, _ = context(launch(tmp_path, job, micro_batch=32))
    assert (ctx.batch_size, ctx.micro_batch, ctx.accumulation) == (100, 32, 4)
    ctx, _, _ = context(launch(tmp_path, job, micro_batch=512))
    assert (ctx.micro_batch, ctx.accumulation) == (100, 1)


def test_checkpoints_are_atomic_and_named_by_epoch_and_step(tmp_path: Path) -> None:
    ctx, channel, _ = context(launch(tmp_path, spec(), epoch=4))
    paths = [ctx.save_checkpoint({"step": s, "w": torch.ones(2) * s}) for s in (5, 10, 15, 20)]
    assert [p.name for p in paths] == ["e4-s5.pt", "e4-s10.pt", "e4-s15.pt", "e4-s20.pt"]
    ctx.wait_checkpoints()  # written in the background; recorded once durable
    assert channel.sent == [CheckpointSaved(step=int(p.name[4:-3]), path=str(p)) for p in paths]
    # all kept (the supervisor prunes what it recorded); no temporary files left behind
    assert sorted(p.name for p in ctx.checkpoint_dir.iterdir()) == sorted(p.name for p in paths)


def test_load_skips_what_does_not_load_and_says_why(tmp_path: Path) -> None:
    writer, _, _ = context(launch(tmp_path, spec()))
    good = writer.save_checkpoint({"step": 10, "w": torch.arange(3)})
    not_a_state = writer.save_checkpoint({"step": 20})
    writer.wait_checkpoints()
    torch.save({"no": "step"}, not_a_state)
    truncated = writer.save_checkpoint({"step": 30, "w": torch.arange(3)})
    writer.wait_checkpoints()
    truncated.write_bytes(truncated.read_bytes()[:50])
    missing = tmp_path / "gone" / "e1-s40.pt"
    resume_from = [missing, truncated, not_a_state, good]
    ctx, channel, _ = context(launch(tmp_path, spec(), epoch=2, resume_from=resume_from))
    state = ctx.load_checkpoint()
    assert state is not None and state["step"] == 10
    assert torch.equal(state["w"], torch.arange(3))
    skipped = [m for m in channel.sent if isinstance(m, CheckpointSkipped)]
    assert [s.path for s in skipped] == [str(missing), str(truncated), str(not_a_state)]
    assert skipped[0].reason.startswith("FileNotFoundError")
    assert "no int 'step'" in skipped[2].reason
    assert channel.sent[-1] == Resumed(step=10, path=str(good))
    assert ctx.last_saved_step == 10


def test_a_restore_that_fails_skips_that_checkpoint(tmp_path: Path) -> None:
    writer, _, _ = context(launch(tmp_path, spec()))
    older = writer.save_checkpoint({"step": 1, "w": torch.zeros(2)})
    newer = writer.save_checkpoint({"step": 2, "w": torch.zeros(5)})
    writer.wait_checkpoints()

    def restore(state: dict[str, torch.Tensor]) -> int:
        if state["w"].shape != (2,):
            raise ValueError("does not fit the model")
        return 7

    ctx, channel, _ = context(launch(tmp_path, spec(), resume_from=[newer, older]))
    assert ctx.load_checkpoint(restore) == 7
    assert isinstance(channel.sent[0], CheckpointSkipped)
    assert "does not fit" in channel.sent[0].reason
    ctx, _, _ = context(launch(tmp_path, spec()))
    assert ctx.load_checkpoint() is None  # nothing to resume from


def test_directory_checkpoints(tmp_path: Path) -> None:
    ctx, channel, _ = context(launch(tmp_path, spec(), epoch=3))

    def write(directory: Path) -> None:
        (directory / "data").write_text("x")

    path = ctx.save_checkpoint_dir(8, write)
    assert path.name == "e3-s8" and (path / "data").read_text() == "x"
    ctx.save_checkpoint_dir(8, write)  # the same step again (an out-of-memory restart)
    bad_name = tmp_path / "elsewhere"
    bad_name.mkdir()
    reader, channel, _ = context(launch(tmp_path, spec(), resume_from=[bad_name, path]))
    assert reader.load_checkpoint_dir(lambda p: (p / "data").read_text()) == "x"
    assert channel.sent[-1] == Resumed(step=8, path=str(path))
    assert checkpoints.parse_step(Path("e12-s345.pt")) == 345


def test_faults_need_both_the_worker_switch_and_the_spec(tmp_path: Path) -> None:
    job = spec(faults={"oom_above_micro_batch": 8, "fail_at_step": 3, "fail_with": "transient"})
    off, _, _ = context(launch(tmp_path, job, fault_injection=False, micro_batch=64))
    off.faults.check_step(3, 64)  # nothing happens
    on, _, _ = context(launch(tmp_path, job, micro_batch=64))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        on.faults.check_step(1, 64)
    with pytest.raises(InjectedTransientError):
        on.faults.check_step(3, 8)
    on.faults.check_step(4, 8)
    second, _, _ = context(launch(tmp_path, job, attempt=2))
    second.faults.check_step(3, 8)  # only the first attempt fails


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
        (MemoryError(), "oom"),
        (InjectedTransientError("x"), "infra"),
        (OSError("disk"), "infra"),
        (UserError("bad"), "user_error"),
        (ValueError("bad"), "user_error"),
        (KeyError("k"), "user_error"),
        (SystemExit(3), "user_error"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_synthetic_data_is_seeded() -> None:
    reg = ModelSpec(input_dim=8, hidden_units=[4], output_dim=2)
    a, b = synthetic(reg, samples=50, seed=1), synthetic(reg, samples=50, seed=1)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.x.dtype == np.float32 and a.y.shape == (50, 2)
    assert not np.array_equal(synthetic(reg, samples=50, seed=2).x, a.x)
    cls = ModelSpec(input_dim=8, output_dim=3, task="classification")
    labels = synthetic(cls, samples=500, seed=0).y
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1, 2}


def test_data_paths_stay_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.npz").write_bytes(b"")
    (tmp_path / "outside.npz").write_bytes(b"")
    (root / "link.npz").symlink_to(tmp_path / "outside.npz")
    (root / "escape").symlink_to(tmp_path)
    assert resolve_data_path(root, "sub/ok.npz") == (root / "sub" / "ok.npz").resolve()
    for bad in ("../outside.npz", "sub/../../outside.npz", "link.npz", "escape/outside.npz"):
        with pytest.raises(UserError, match="leaves the data root"):
            resolve_data_path(root, bad)
    with pytest.raises(UserError, match="relative"):
        resolve_data_path(root, str(tmp_path / "outside.npz"))
    with pytest.raises(UserError, match="not found"):
        resolve_data_path(root, "sub/missing.npz")


def test_data_files_are_checked_against_the_model(tmp_path: Path) -> None:
    model = ModelSpec(input_dim=3, hidden_units=[4], output_dim=1)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((5, 4)), y=np.zeros(5))
    with pytest.raises(UserError, match="model wants"):
        load_file(model, tmp_path / "wrong.npz")
    np.savez(tmp_path / "no_y.npz", x=np.zeros((5, 3)))
    with pytest.raises(UserError, match="'x' and 'y'"):
        load_file(model, tmp_path / "no_y.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        load_file(model, tmp_path / "garbage.npz")
    (tmp_path / "plain.csv").write_text("1,2,3,4\n5,6,7,8\n")
    data = load_file(model, tmp_path / "plain.csv")
    assert data.x.tolist() == [[1, 2, 3], [5, 6, 7]] and data.y.tolist() == [[4], [8]]
    cls = ModelSpec(input_dim=3, output_dim=2, task="classification")
    (tmp_path / "labels.csv").write_text("a,b,c,label\n1,2,3,0\n4,5,6,2\n")
    with pytest.raises(UserError, match=r"labels must be in \[0, 2\)"):
        load_file(cls, tmp_path / "labels.csv")
