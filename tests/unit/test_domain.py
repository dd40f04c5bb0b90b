"""Pure domain rules: routing, spec validation, retry arithmetic."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from app.domain import gangs, retry, routing
from app.domain.spec import JobSpec, SpecPolicyError, check_policy


@pytest.mark.parametrize(
    ("memory_gb", "tier"), [(0.5, 8), (8, 8), (8.1, 16), (16, 16), (40, 40), (80, 80), (141, 141)]
)
def test_a_job_goes_to_the_smallest_tier_that_holds_it(memory_gb: float, tier: int) -> None:
    assert routing.job_tier(memory_gb) == tier


def test_memory_beyond_the_largest_tier_is_refused() -> None:
    with pytest.raises(routing.RoutingError, match="largest GPU tier"):
        routing.job_tier(193)


@pytest.mark.parametrize(
    ("measured_gib", "largest"),
    [(15.0, 16), (22.5, 24), (79.6, 80), (39.4, 40), (140.4, 141), (7.5, 8)],
)
def test_cards_that_measure_less_than_their_label_serve_their_tier(
    measured_gib: float, largest: int
) -> None:
    assert routing.device_tiers(measured_gib)[0] == largest


def test_a_device_serves_largest_tiers_first_own_type_before_any() -> None:
    queues = routing.device_queues("t4", 15.0)
    assert queues == ["gpu.T4.16", "gpu.any.16", "gpu.T4.8", "gpu.any.8"]


def test_device_fits() -> None:
    assert routing.device_fits(
        device_type="A100", device_memory_gib=80, job_type="any", job_memory_gb=40
    )
    assert not routing.device_fits(
        device_type="T4", device_memory_gib=15, job_type="any", job_memory_gb=40
    )
    assert not routing.device_fits(
        device_type="T4", device_memory_gib=15, job_type="A100", job_memory_gb=8
    )


def test_spec_routes_case_insensitively() -> None:
    spec = JobSpec.model_validate(
        {"framework": "torch", "resources": {"gpu_type": "a100", "memory_gb": 40}}
    )
    assert spec.queue == "gpu.A100.40"


def test_alternative_types_wait_in_each_fitting_queue() -> None:
    # Given a job that can use a V100 or a T4 (the trace's "V100 16 GB or T4")
    spec = JobSpec.model_validate(
        {"framework": "torch", "resources": {"gpu_type": ["v100", "T4", "V100"], "memory_gb": 12}}
    )
    # Then the types are normalized once each, in the order given, and it waits in both queues
    assert spec.resources.gpu_type == ["V100", "T4"]
    assert routing.split_queues(spec.queue) == ["gpu.V100.16", "gpu.T4.16"]
    tf = spec.model_copy(update={"framework": "tensorflow"})
    assert routing.split_queues(tf.queue) == ["gpu.V100.16.tensorflow", "gpu.T4.16.tensorflow"]


def test_a_list_with_any_is_any_and_a_list_of_one_is_that_type() -> None:
    assert routing.normalize_types(["T4", "any"]) == "any"
    assert routing.normalize_types(["t4"]) == "T4"
    assert routing.describe_types(["V100", "T4"]) == "V100 or T4"
    one = JobSpec.model_validate({"framework": "torch", "resources": {"gpu_type": ["a100"]}})
    assert one.queue == "gpu.A100.8"


def test_a_device_fits_a_job_that_lists_its_type() -> None:
    fits = {
        device: routing.device_fits(
            device_type=device, device_memory_gib=15, job_type=["V100", "T4"], job_memory_gb=12
        )
        for device in ("T4", "V100", "A10")
    }
    assert fits == {"T4": True, "V100": True, "A10": False}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"framework": "torch", "colour": "red"}, "colour"),
        ({"framework": "torch", "resources": {"memory_gb": -1}}, "memory_gb"),
        ({"framework": "jax"}, "framework"),
        ({"framework": "torch", "resources": {"gpu_count": 17}}, "gpu_count"),
        (
            {"framework": "tensorflow", "entrypoint": "a.b:c", "resources": {"gpu_count": 2}},
            "custom TensorFlow trainer of several GPUs",
        ),
        ({}, "framework"),
        ({"framework": "torch", "entrypoint": "os.system"}, "package.module:function"),
        ({"framework": "torch", "data": {"source": "file", "path": "../etc/x.npz"}}, ".."),
        ({"framework": "torch", "priority": 10}, "priority"),
        ({"framework": "torch", "resources": {"gpu_type": "A100; rm"}}, "gpu_type"),
        ({"framework": "torch", "resources": {"gpu_type": []}}, "empty list"),
        ({"framework": "torch", "resources": {"gpu_type": ["T4", "A1 00"]}}, "gpu_type"),
        ({"framework": "torch", "resources": {"gpu_type": ["T4"] * 9}}, "gpu_type"),
        ({"framework": "torch", "name": "nightly\x00run"}, "control character '\\x00'"),
        ({"framework": "torch", "name": "a\x1b[2Jb"}, "at position 1"),
        ({"framework": "torch", "data": {"source": "file", "path": "x\x00.npz"}}, "data.path"),
        ({"framework": "torch", "training": {"seed": -1}}, "training.seed"),
        ({"framework": "torch", "data": {"seed": 2**70}}, "data.seed"),
    ],
)
def test_bad_specs_are_refused_with_a_message_naming_the_problem(
    body: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert needle in str(info.value)


def test_policy_allows_only_listed_entrypoint_prefixes_and_gated_faults() -> None:
    custom = JobSpec.model_validate({"entrypoint": "team.trainers.bert:train"})
    check_policy(custom, entrypoint_prefixes=("team.trainers",), fault_injection=False)
    with pytest.raises(SpecPolicyError, match="not under an allowed prefix"):
        check_policy(custom, entrypoint_prefixes=("team.train",), fault_injection=False)
    faulty = JobSpec.model_validate({"framework": "torch", "faults": {"step_delay_s": 1}})
    with pytest.raises(SpecPolicyError, match="GPUFLEET_FAULT_INJECTION"):
        check_policy(faulty, entrypoint_prefixes=(), fault_injection=False)
    check_policy(faulty, entrypoint_prefixes=(), fault_injection=True)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    waits = [retry.infra_backoff(n, base=2, cap=60, rng=rng) for n in range(1, 10)]
    for n, wait in enumerate(waits, start=1):
        bound = min(60, 2 * 2 ** (n - 1))
        assert bound / 2 <= wait <= bound
    assert len({round(w, 6) for w in waits}) == len(waits)  # jittered


def test_oom_backoff_halves_down_to_one_keeping_the_effective_batch() -> None:
    micro, tries = 256, [256]
    while (smaller := retry.next_micro_batch(micro)) is not None:
        micro = smaller
        tries.append(micro)
    assert tries == [256, 128, 64, 32, 16, 8, 4, 2, 1]  # log2(256) + 1 tries
    assert retry.accumulation_for(256, 64) == 4
    assert retry.accumulation_for(100, 12) == 9  # ceil: the last micro-batch is short


def test_a_gang_larger_than_every_host_is_refused_naming_the_largest() -> None:
    hosts = {"host-4": 4, "host-2": 2}
    assert gangs.host_refusal(gpu_count=4, fitting_per_host=hosts, wanted="x") is None
    refusal = gangs.host_refusal(gpu_count=5, fitting_per_host=hosts, wanted="gpu_type=any")
    assert refusal is not None and "largest has 4" in refusal and "(host-4)" in refusal
    # An empty fleet may still be starting: nothing is refused for its size
    assert gangs.host_refusal(gpu_count=5, fitting_per_host={}, wanted="x") is None
    assert gangs.gang_refusal(gpu_count=1, fitting_per_host={}, wanted="x") is None


def test_a_command_may_run_on_several_gpus_as_ranks() -> None:
    spec = JobSpec.model_validate({"command": "python t.py", "resources": {"gpu_count": 2}})
    assert spec.resources.gpu_count == 2 and spec.distributed_training
