"""The built-in torch MLP as a gang of 2 ranks (torch.distributed, gloo on the CPU), each rank a
real trainer process started the way a gang's leader starts them (the standard RANK /
WORLD_SIZE / MASTER_* environment)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.domain.spec import JobSpec
from tests.e2e.fleet import free_port
from tests.trainer_support import Outcome, Trainer, launch, run_trainer, spec

#: the stated tolerance of 2 ranks against one process with the same global batch: the same
#: full-batch gradient, summed in another order (measured: ~1e-7 relative).
LOSS_TOLERANCE = 1e-5


def _gang(tmp_path: Path, job_spec: JobSpec, name: str, **launch_args: object) -> list[Outcome]:
    """Run 2 ranks of one job to their end; returns their outcomes, rank 0 first."""
    port = str(free_port())
    trainers = [
        Trainer(
            launch(tmp_path, job_spec, **launch_args),  # type: ignore[arg-type]
            tmp_path / name / f"rank{rank}",
            env={
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda t: t.collect(), trainers))
    for o in outcomes:
        assert o.code == 0, o.stderr
    return outcomes


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> list[Outcome]:
    """The small job (batch 64, 96 steps, a checkpoint every 20) on 2 ranks, uninterrupted."""
    return _gang(tmp_path_factory.mktemp("whole"), spec(), "whole")


def test_two_ranks_end_with_the_loss_of_one_process_at_the_same_global_batch(
    tmp_path: Path, whole: list[Outcome]
) -> None:
    # Given the small job once on one process and once on 2 ranks
    single = run_trainer(launch(tmp_path, spec()), tmp_path / "one")
    ranks = whole
    # Then both ranks end with the same weights, and the loss is one process's, within the
    # stated tolerance (each rank trained on its half of every batch)
    assert ranks[0].result.weights_sha256 == ranks[1].result.weights_sha256
    one_loss = single.result.final_loss
    gang_loss = ranks[0].result.final_loss
    assert abs(gang_loss - one_loss) <= LOSS_TOLERANCE * abs(one_loss), (gang_loss, one_loss)
    assert "rank 1 of 2" in ranks[1].stderr + ranks[1].stdout + str(ranks[1].messages)
    # And only rank 0 wrote checkpoints
    assert len(ranks[0].checkpoints) == 4 and ranks[1].checkpoints == []


def test_two_ranks_resumed_from_a_checkpoint_end_bit_for_bit_as_an_uninterrupted_run(
    tmp_path: Path, whole: list[Outcome]
) -> None:
    job = spec()
    # Given a gang that stopped after its second checkpoint (step 40)
    cut = spec(training={"max_steps": 40})
    first = _gang(tmp_path, cut, "first", job_id="cut")
    assert [c.step for c in first[0].checkpoints] == [20, 40]
    # When a new gang resumes from it (the next lease epoch)
    resumed = _gang(
        tmp_path, job, "resumed", job_id="cut", epoch=2, resume_from=first[0].newest_first()
    )
    # Then it ends with the uninterrupted gang's weights, bit for bit
    assert resumed[0].resumed and resumed[0].resumed[0].step == 40
    sha = {r.result.weights_sha256 for r in resumed}
    assert sha == {whole[0].result.weights_sha256}
