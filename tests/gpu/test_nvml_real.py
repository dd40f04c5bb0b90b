"""Discovery and sampling against the real NVML of a GPU host.

Skipped where ``nvidia-smi`` is absent (no NVIDIA driver); run with ``pytest -m gpu`` on a GPU box.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest

from workers.devices import NvmlSampler, check_health, discover, nvml_health

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        shutil.which("nvidia-smi") is None,
        reason="needs an NVIDIA GPU and driver: nvidia-smi is not on PATH",
    ),
]

GIB = 2**30


def nvidia_smi_gpus() -> list[str]:
    """``nvidia-smi -L`` lines for whole GPUs (MIG instances are indented under them)."""
    listing = subprocess.run(
        ["nvidia-smi", "-L"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [line for line in listing.splitlines() if line.startswith("GPU ")]


def test_real_discovery_lists_every_gpu_with_sane_fields() -> None:
    # Given a host with an NVIDIA driver
    # When gpufleet discovers its devices without simulation
    found = discover(fake_gpus=None, host=socket.gethostname())
    # Then it finds as many as nvidia-smi, in index order, with plausible fields
    smi = nvidia_smi_gpus()
    assert len(found) >= 1
    assert len(found) == len(smi), smi
    assert [d.index for d in found] == list(range(len(found)))
    for device, line in zip(found, smi, strict=True):
        assert not device.simulated
        assert device.uuid.startswith(("GPU-", "MIG-"))
        assert device.uuid in line, (device.uuid, line)
        assert device.name and device.name in line, (device.name, line)
        assert re.fullmatch(r"[A-Z0-9]{1,32}", device.gpu_type)
        assert 1 * GIB <= device.memory_bytes <= 512 * GIB
        assert re.fullmatch(
            r"[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]", device.pci_bus_id
        )
    assert len({d.uuid for d in found}) == len(found)
    assert len({d.pci_bus_id for d in found}) == len(found)


def test_real_sampling_returns_sane_numbers() -> None:
    # Given the real devices and an NVML sampler
    found = discover(fake_gpus=None, host=socket.gethostname())
    assert found
    with NvmlSampler() as sampler:
        # When each is sampled twice
        for device in found:
            for _ in range(2):
                sample = sampler.sample(device, busy=False)
                # Then the numbers are measured and plausible
                assert not sample.simulated
                assert 0.0 <= sample.utilization <= 1.0
                assert sample.memory_total_bytes == device.memory_bytes
                assert 0 <= sample.memory_used_bytes <= sample.memory_total_bytes
                if sample.temperature_c is not None:
                    assert 5.0 <= sample.temperature_c <= 110.0
                if sample.power_w is not None:
                    assert 1.0 <= sample.power_w <= 1500.0


def test_real_health_check_passes_on_a_healthy_gpu_and_fails_for_an_unknown_one() -> None:
    # Given the real devices of a healthy host
    found = discover(fake_gpus=None, host=socket.gethostname())
    assert found
    # Then each answers NVML's health reads, and a uuid no GPU has does not
    for device in found:
        health = check_health(device)
        assert health.healthy, (device.uuid, health.detail)
        assert health.detail.startswith("answers")
    assert not nvml_health("GPU-00000000-0000-0000-0000-000000000000").healthy
