import pytest

from workers.gang import rank_environment


def test_each_rank_knows_its_place_and_the_gangs_devices() -> None:
    devices = ["GPU-a", "GPU-b"]
    envs = [
        rank_environment(rank=r, devices=devices, master_port=29500, real_gpus=True)
        for r in range(2)
    ]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert {e["MASTER_PORT"] for e in envs} == {"29500"}
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"GPU-a,GPU-b"}


def test_simulated_devices_set_no_cuda_variable_and_ranks_stay_inside() -> None:
    env = rank_environment(rank=1, devices=["sim-0", "sim-1"], master_port=1, real_gpus=False)
    assert "CUDA_VISIBLE_DEVICES" not in env
    with pytest.raises(ValueError, match="outside a gang of 2"):
        rank_environment(rank=2, devices=["sim-0", "sim-1"], master_port=1, real_gpus=False)
