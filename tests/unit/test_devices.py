"""Device discovery and sampling against a recorded fake of the NVML calls.

The fake replays what nvidia-ml-py returned on a two-GPU box (an H100 80GB HBM3 and an
A100-SXM4-40GB), with pynvml's exception hierarchy and its quirks: strings are bytes in old
versions and str in new ones, and ``nvmlDeviceGetHandleByUUID`` only takes bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workers import devices
from workers.devices import (
    GpuDevice,
    GpuSample,
    NvmlSampler,
    NvmlUnavailable,
    SimulatedSampler,
    discover,
    discover_nvml,
    normalize_gpu_type,
    parse_fake_gpus,
    sampler_for,
)

GIB = 2**30


# --- the recorded fake --------------------------------------------------------------------


class NVMLError(Exception):
    """Mirrors pynvml.NVMLError: a value, and a subclass per NVML_ERROR_* code named as pynvml
    names them (NVMLError_NotSupported, ...); a subclass is raised with no arguments."""

    value = 999
    message = "Unknown Error"

    def __str__(self) -> str:
        return self.message


class NVMLError_NotSupported(NVMLError):
    value, message = 3, "Not Supported"


class NVMLError_DriverNotLoaded(NVMLError):
    value, message = 9, "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    value, message = 12, "NVML Shared Library Not Found"


class NVMLError_GpuIsLost(NVMLError):
    value, message = 15, "GPU is lost"


class NVMLError_Uninitialized(NVMLError):
    value, message = 1, "Uninitialized"


class NVMLError_Unknown(NVMLError):
    value, message = 999, "Unknown Error"


@dataclass
class RecordedGpu:
    name: str
    uuid: str
    bus_id: str
    total: int
    used: int
    utilization_gpu: int
    temperature: int | None
    power_mw: int | None


H100 = RecordedGpu(
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-5e2f8a1c-7d3b-4c0e-9a61-2b8f4d6e1a07",
    bus_id="00000000:1B:00.0",
    total=85520809984,
    used=61342466048,
    utilization_gpu=97,
    temperature=64,
    power_mw=512345,
)
A100 = RecordedGpu(
    name="NVIDIA A100-SXM4-40GB",
    uuid="GPU-0b9c3d2e-1f4a-4e5b-8c6d-7e8f9a0b1c2d",
    bus_id="00000000:3B:00.0",
    total=42949672960,
    used=446693376,
    utilization_gpu=0,
    temperature=None,  # not reported: NVMLError_NotSupported
    power_mw=None,
)


@dataclass
class FakeNvml:
    """State of one fake pynvml module: what it returns and which calls it saw."""

    gpus: list[RecordedGpu]
    strings_as_bytes: bool = False
    init_error: type[NVMLError] | None = None
    failures: dict[tuple[str, int], type[NVMLError]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    initialised: int = 0
    #: per index: retired pages pending (NVML_FEATURE_ENABLED = 1); absent: not supported.
    pages_pending: dict[int, int] = field(default_factory=dict)
    #: per index: (corrected, uncorrected, pending, failed) remapped rows; absent: unsupported.
    remapped_rows: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("pynvml")
        for cls in (
            NVMLError,
            NVMLError_NotSupported,
            NVMLError_DriverNotLoaded,
            NVMLError_LibraryNotFound,
            NVMLError_GpuIsLost,
            NVMLError_Uninitialized,
            NVMLError_Unknown,
        ):
            setattr(fake, cls.__name__, cls)
        fake.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetHandleByUUID",
            "nvmlDeviceGetName",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetPciInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetRetiredPagesPendingStatus",
            "nvmlDeviceGetRemappedRows",
        ):
            setattr(fake, name, getattr(self, name))
        return fake

    # helpers
    def _s(self, value: str) -> str | bytes:
        return value.encode() if self.strings_as_bytes else value

    def _check(self, call: str, index: int) -> RecordedGpu:
        self.calls.append(call)
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        failure = self.failures.get((call, index))
        if failure is not None:
            raise failure()
        return self.gpus[index]

    # the NVML calls
    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self.init_error()
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self.calls.append("nvmlDeviceGetCount")
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        failure = self.failures.get(("nvmlDeviceGetCount", -1))
        if failure is not None:
            raise failure()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check("nvmlDeviceGetHandleByIndex", index)
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> int:
        self.calls.append("nvmlDeviceGetHandleByUUID")
        if not isinstance(uuid, bytes):  # ctypes.c_char_p(str) in nvidia-ml-py 13
            raise TypeError("bytes or integer address expected instead of str instance")
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid.encode() == uuid:
                return index
        raise NVMLError_Unknown()

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self._s(self._check("nvmlDeviceGetName", handle).name)

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        return self._s(self._check("nvmlDeviceGetUUID", handle).uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        gpu = self._check("nvmlDeviceGetMemoryInfo", handle)
        return types.SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        gpu = self._check("nvmlDeviceGetPciInfo", handle)
        return types.SimpleNamespace(busId=self._s(gpu.bus_id), bus=int(gpu.bus_id[9:11], 16))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        gpu = self._check("nvmlDeviceGetUtilizationRates", handle)
        return types.SimpleNamespace(gpu=gpu.utilization_gpu, memory=gpu.utilization_gpu // 2)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        gpu = self._check("nvmlDeviceGetTemperature", handle)
        assert sensor == 0, "only NVML_TEMPERATURE_GPU is recorded"
        if gpu.temperature is None:
            raise NVMLError_NotSupported()
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        gpu = self._check("nvmlDeviceGetPowerUsage", handle)
        if gpu.power_mw is None:
            raise NVMLError_NotSupported()
        return gpu.power_mw

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        self._check("nvmlDeviceGetRetiredPagesPendingStatus", handle)
        if handle not in self.pages_pending:
            raise NVMLError_NotSupported()
        return self.pages_pending[handle]

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        self._check("nvmlDeviceGetRemappedRows", handle)
        if handle not in self.remapped_rows:
            raise NVMLError_NotSupported()
        return self.remapped_rows[handle]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    state = FakeNvml(gpus=[H100, A100])
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    return state


def real_device(gpu: RecordedGpu, index: int) -> GpuDevice:
    return GpuDevice(
        index=index,
        uuid=gpu.uuid,
        name=gpu.name,
        gpu_type=normalize_gpu_type(gpu.name),
        memory_bytes=gpu.total,
        pci_bus_id=gpu.bus_id,
        simulated=False,
    )


# --- discovery ----------------------------------------------------------------------------


def test_discover_nvml_lists_devices_in_index_order_with_measured_fields(nvml: FakeNvml) -> None:
    # Given the recorded two-GPU box
    # When NVML is asked for its devices
    found = discover_nvml()
    # Then both come back, in NVML index order, with what NVML measured
    assert found == [
        GpuDevice(
            index=0,
            uuid="GPU-5e2f8a1c-7d3b-4c0e-9a61-2b8f4d6e1a07",
            name="NVIDIA H100 80GB HBM3",
            gpu_type="H100",
            memory_bytes=85520809984,
            pci_bus_id="00000000:1B:00.0",
            simulated=False,
        ),
        GpuDevice(
            index=1,
            uuid="GPU-0b9c3d2e-1f4a-4e5b-8c6d-7e8f9a0b1c2d",
            name="NVIDIA A100-SXM4-40GB",
            gpu_type="A100",
            memory_bytes=42949672960,
            pci_bus_id="00000000:3B:00.0",
            simulated=False,
        ),
    ]
    assert found[0].memory_gib == pytest.approx(79.647, abs=1e-3)
    assert found[1].memory_gib == 40.0
    # and NVML is shut down again
    assert nvml.calls[0] == "nvmlInit"
    assert nvml.calls[-1] == "nvmlShutdown"
    assert nvml.initialised == 0


@pytest.mark.parametrize("strings_as_bytes", [True, False], ids=["old-bytes", "new-str"])
def test_discover_nvml_reads_strings_as_bytes_or_str(
    nvml: FakeNvml, strings_as_bytes: bool
) -> None:
    # Given an nvidia-ml-py that returns names, UUIDs and bus ids as bytes (old) or str (new)
    nvml.strings_as_bytes = strings_as_bytes
    # When devices are discovered
    found = discover_nvml()
    # Then every string field is a str, decoded
    assert [d.name for d in found] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    assert [d.uuid for d in found] == [H100.uuid, A100.uuid]
    assert [d.pci_bus_id for d in found] == [H100.bus_id, A100.bus_id]
    assert all(type(d.name) is str and type(d.pci_bus_id) is str for d in found)


@pytest.mark.parametrize("error", [NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded])
def test_discover_without_driver_returns_nothing_and_logs_one_warning(
    nvml: FakeNvml, error: type[NVMLError], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a host whose NVML init fails: no library, or no driver loaded
    nvml.init_error = error
    caplog.set_level(logging.DEBUG, logger="workers.devices")
    # When the worker discovers its devices
    found = discover(fake_gpus=None, host="node-1")
    # Then there are none, and one warning line says why and how to simulate devices
    assert found == []
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    assert message.startswith("no NVIDIA driver/NVML: ")
    assert error.message in message
    assert "set GPUFLEET_FAKE_GPUS=" in message
    assert records[0].exc_info is None
    # and NVML, never initialised, is not shut down (that would raise Uninitialized)
    assert "nvmlShutdown" not in nvml.calls


def test_discover_without_the_pynvml_package_returns_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an environment without nvidia-ml-py (import pynvml raises ImportError)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    # When devices are discovered
    with caplog.at_level(logging.WARNING, logger="workers.devices"):
        found = discover(fake_gpus=None, host="node-1")
    # Then there are none and the warning names the missing package
    assert found == []
    assert len(caplog.records) == 1
    assert "nvidia-ml-py" in caplog.records[0].getMessage()


def test_discover_nvml_raises_nvml_unavailable_with_its_docstring(nvml: FakeNvml) -> None:
    # Given NVML that fails at init with any NVMLError
    nvml.init_error = NVMLError_Unknown
    # When discover_nvml runs, Then it raises NvmlUnavailable whose message is its docstring
    with pytest.raises(NvmlUnavailable) as raised:
        discover_nvml()
    assert str(raised.value).startswith("No NVIDIA driver/NVML on this host")
    assert "Unknown Error" in str(raised.value)
    assert isinstance(raised.value.__cause__, NVMLError_Unknown)


def test_shutdown_runs_when_counting_devices_fails(nvml: FakeNvml) -> None:
    # Given NVML that initialises and then fails to count its devices
    nvml.failures[("nvmlDeviceGetCount", -1)] = NVMLError_Unknown
    # When devices are discovered, Then the error propagates
    with pytest.raises(NVMLError_Unknown):
        discover_nvml()
    # and NVML was shut down anyway
    assert nvml.calls[-1] == "nvmlShutdown"
    assert nvml.initialised == 0


@pytest.mark.parametrize(
    "call", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo"]
)
def test_a_device_nvml_cannot_describe_is_skipped_and_nvml_shut_down(
    nvml: FakeNvml, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given GPU 0 fallen off the bus: a per-device call fails for it
    nvml.failures[(call, 0)] = NVMLError_GpuIsLost
    # When devices are discovered
    with caplog.at_level(logging.WARNING, logger="workers.devices"):
        found = discover_nvml()
    # Then the other device keeps its NVML index, the lost one is named in a warning
    assert [(d.index, d.gpu_type) for d in found] == [(1, "A100")]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["skipping GPU 0: NVML cannot describe it (GPU is lost)"]
    # and NVML was shut down
    assert nvml.calls[-1] == "nvmlShutdown"
    assert nvml.initialised == 0


def test_discover_with_fake_gpus_never_touches_nvml(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    # Given GPUFLEET_FAKE_GPUS set on a host that does have NVML
    caplog.set_level(logging.INFO, logger="workers.devices")
    # When devices are discovered
    found = discover(fake_gpus="A100:80,T4:16", host="node-1")
    # Then they are the simulated ones, NVML is not called, and the log says they are simulated
    assert [(d.gpu_type, d.simulated) for d in found] == [("A100", True), ("T4", True)]
    assert nvml.calls == []
    assert any("simulated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("blank", ["", "  "])
def test_blank_fake_gpus_means_unset(nvml: FakeNvml, blank: str) -> None:
    # Given GPUFLEET_FAKE_GPUS set but blank (the settings default)
    # When devices are discovered, Then NVML's real devices are used
    assert [d.gpu_type for d in discover(fake_gpus=blank, host="h")] == ["H100", "A100"]


def test_discover_with_a_malformed_fake_spec_raises(nvml: FakeNvml) -> None:
    # A malformed spec is a startup error, not a silent fallback to NVML
    with pytest.raises(ValueError, match="GPUFLEET_FAKE_GPUS"):
        discover(fake_gpus="A100=80", host="h")
    assert nvml.calls == []


# --- the fake spec ------------------------------------------------------------------------


def test_parse_fake_gpus_declares_simulated_devices() -> None:
    found = parse_fake_gpus("A100:80,T4:16", host="node-1")
    assert found == [
        GpuDevice(
            index=0,
            uuid="GPU-sim-node-1-0-A100",
            name="Simulated A100",
            gpu_type="A100",
            memory_bytes=80 * GIB,
            pci_bus_id="sim:0",
            simulated=True,
        ),
        GpuDevice(
            index=1,
            uuid="GPU-sim-node-1-1-T4",
            name="Simulated T4",
            gpu_type="T4",
            memory_bytes=16 * GIB,
            pci_bus_id="sim:1",
            simulated=True,
        ),
    ]


def test_parse_fake_gpus_is_case_insensitive_and_tolerates_spaces() -> None:
    found = parse_fake_gpus(" a100 : 80 , l40s:48,rtx4090:24", host="h")
    assert [d.gpu_type for d in found] == ["A100", "L40S", "RTX4090"]
    assert [d.memory_bytes for d in found] == [80 * GIB, 48 * GIB, 24 * GIB]


def test_parse_fake_gpus_accepts_fractional_gigabytes() -> None:
    (l4,) = parse_fake_gpus("L4:22.5", host="h")
    assert l4.memory_bytes == round(22.5 * GIB)
    assert l4.memory_gib == 22.5


def test_simulated_uuids_are_stable_per_host_index_and_type() -> None:
    first = parse_fake_gpus("A100:80,A100:80", host="gpu-box.example.com")
    again = parse_fake_gpus("A100:80,A100:80", host="gpu-box.example.com")
    other_host = parse_fake_gpus("A100:80,A100:80", host="other")
    assert [d.uuid for d in first] == [d.uuid for d in again]
    assert len({d.uuid for d in first + other_host}) == 4
    # sanitised: fit for CUDA_VISIBLE_DEVICES and log lines
    assert first[0].uuid == "GPU-sim-gpu-box-example-com-0-A100"
    assert all(re.fullmatch(r"[A-Za-z0-9-]+", d.uuid) for d in first)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "no devices declared"),
        ("A100", "is not TYPE:GB"),
        ("A100=80", "is not TYPE:GB"),
        ("A100:80,", "is not TYPE:GB"),
        (":80", "is not TYPE:GB"),
        ("A100:", "is not TYPE:GB"),
        ("A100:eighty", "is not a number"),
        ("A100:80GB", "is not a number"),
        ("A100:0", "must be a positive number"),
        ("A100:-16", "must be a positive number"),
        ("A100:nan", "must be a positive number"),
        ("A100:inf", "must be a positive number"),
        ("A1.00:80", "is not letters and digits"),
        ("any:80", "'any' is a queue name"),
    ],
)
def test_parse_fake_gpus_rejects_malformed_specs(spec: str, problem: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_fake_gpus(spec, host="h")
    message = str(raised.value)
    assert "GPUFLEET_FAKE_GPUS" in message
    assert "TYPE:GB,TYPE:GB" in message
    assert problem in message


# --- type names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("product_name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla P100-PCIE-16GB", "P100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA GeForce RTX 3090 Ti", "RTX3090TI"),
        ("NVIDIA RTX A6000", "RTXA6000"),
        ("Quadro RTX 8000", "RTX8000"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX6000ADA"),
        ("NVIDIA TITAN RTX", "TITANRTX"),
        ("Simulated A100", "A100"),
        (b"NVIDIA H100 80GB HBM3".decode(), "H100"),
        ("a100", "A100"),
    ],
)
def test_normalize_gpu_type(product_name: str, expected: str) -> None:
    assert normalize_gpu_type(product_name) == expected


@pytest.mark.parametrize(
    "product_name",
    ["", "   ", "NVIDIA", "Graphics Device", "???", "ünknown/gpu.x", "X" * 80, "NVIDIA ---"],
)
def test_unknown_names_become_a_queue_safe_token(product_name: str) -> None:
    token = normalize_gpu_type(product_name)
    assert re.fullmatch(r"[A-Z0-9]{1,32}", token), token


def test_a_device_refuses_a_type_unfit_for_queue_names() -> None:
    with pytest.raises(ValueError, match="upper-case"):
        GpuDevice(
            index=0,
            uuid="u",
            name="n",
            gpu_type="a100.x",
            memory_bytes=1,
            pci_bus_id="sim:0",
            simulated=True,
        )


# --- sampling -----------------------------------------------------------------------------


def test_nvml_sampler_reports_measured_numbers(nvml: FakeNvml) -> None:
    # Given a sampler over the recorded box
    with NvmlSampler() as sampler:
        # When the busy H100 is sampled
        sample = sampler.sample(real_device(H100, 0), busy=True)
    # Then the numbers are NVML's, in the units the rest of gpufleet uses
    assert sample == GpuSample(
        utilization=0.97,
        memory_used_bytes=61342466048,
        memory_total_bytes=85520809984,
        temperature_c=64.0,
        power_w=512.345,
        simulated=False,
    )


def test_nvml_sampler_reports_unsupported_temperature_and_power_as_none(nvml: FakeNvml) -> None:
    # Given a device that does not report temperature or power (NVMLError_NotSupported)
    with NvmlSampler() as sampler:
        # When it is sampled
        sample = sampler.sample(real_device(A100, 1), busy=False)
    # Then those are None, and the rest is measured
    assert sample.temperature_c is None
    assert sample.power_w is None
    assert sample.utilization == 0.0
    assert sample.memory_used_bytes == 446693376
    assert sample.memory_total_bytes == 42949672960


def test_nvml_sampler_initialises_once_and_caches_handles_by_uuid(nvml: FakeNvml) -> None:
    # Given one sampler
    sampler = NvmlSampler()
    # When both devices are sampled three times
    for _ in range(3):
        sampler.sample(real_device(H100, 0), busy=True)
        sampler.sample(real_device(A100, 1), busy=True)
    # Then NVML was initialised once, each handle looked up once by UUID
    assert nvml.calls.count("nvmlInit") == 1
    assert nvml.calls.count("nvmlDeviceGetHandleByUUID") == 2
    assert nvml.initialised == 1
    # and close shuts NVML down once, however often it is called
    sampler.close()
    sampler.close()
    assert nvml.calls.count("nvmlShutdown") == 1
    assert nvml.initialised == 0
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample(real_device(H100, 0), busy=True)


def test_nvml_sampler_without_driver_raises_nvml_unavailable(nvml: FakeNvml) -> None:
    nvml.init_error = NVMLError_DriverNotLoaded
    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        NvmlSampler()


def test_nvml_sampler_refuses_simulated_devices(nvml: FakeNvml) -> None:
    (fake,) = parse_fake_gpus("A100:80", host="h")
    with NvmlSampler() as sampler, pytest.raises(ValueError, match="SimulatedSampler"):
        sampler.sample(fake, busy=True)


def test_nvml_sampler_lets_a_lost_gpu_fail_loudly(nvml: FakeNvml) -> None:
    # A device that cannot report utilization is in trouble: the error reaches the caller
    nvml.failures[("nvmlDeviceGetUtilizationRates", 0)] = NVMLError_GpuIsLost
    with NvmlSampler() as sampler, pytest.raises(NVMLError_GpuIsLost):
        sampler.sample(real_device(H100, 0), busy=True)


def test_simulated_sampler_follows_busy_and_idle() -> None:
    # Given a simulated 80 GB A100 and a seeded sampler
    (device,) = parse_fake_gpus("A100:80", host="h")
    sampler = SimulatedSampler(random.Random(7))
    # When it is sampled many times busy and idle
    busy = [sampler.sample(device, busy=True) for _ in range(200)]
    idle = [sampler.sample(device, busy=False) for _ in range(200)]
    # Then busy samples look like training, idle ones like an empty GPU
    for s in busy:
        assert 0.85 <= s.utilization <= 0.95
        assert 0.30 * 80 * GIB <= s.memory_used_bytes <= 0.60 * 80 * GIB
        assert s.temperature_c is not None and 55 <= s.temperature_c <= 85
        assert s.power_w is not None and 0 < s.power_w <= 400
    for s in idle:
        assert 0.0 <= s.utilization <= 0.03
        assert 0 < s.memory_used_bytes <= 1 * GIB
        assert s.temperature_c is not None and 25 <= s.temperature_c <= 45
        assert s.power_w is not None and 0 < s.power_w < min(b.power_w or 0 for b in busy)
    assert all(s.simulated and s.memory_total_bytes == 80 * GIB for s in busy + idle)


def test_simulated_sampler_is_reproducible_with_a_seed() -> None:
    (device,) = parse_fake_gpus("T4:16", host="h")
    first = SimulatedSampler(random.Random(42))
    second = SimulatedSampler(random.Random(42))
    assert [first.sample(device, busy=b) for b in (True, False, True)] == [
        second.sample(device, busy=b) for b in (True, False, True)
    ]


def test_simulated_sampler_never_reports_more_memory_than_the_device_has() -> None:
    (tiny,) = parse_fake_gpus("T4:0.1", host="h")
    sample = SimulatedSampler(random.Random(1)).sample(tiny, busy=False)
    assert sample.memory_used_bytes <= tiny.memory_bytes


def test_sample_as_dict_is_json_ready() -> None:
    sample = GpuSample(
        utilization=0.5,
        memory_used_bytes=10,
        memory_total_bytes=20,
        temperature_c=None,
        power_w=100.0,
        simulated=True,
    )
    assert json.loads(json.dumps(sample.as_dict())) == {
        "utilization": 0.5,
        "memory_used_bytes": 10,
        "memory_total_bytes": 20,
        "temperature_c": None,
        "power_w": 100.0,
        "simulated": True,
    }


def test_sampler_for_picks_by_simulated(nvml: FakeNvml) -> None:
    assert isinstance(sampler_for(parse_fake_gpus("A100:80", host="h")), SimulatedSampler)
    assert nvml.calls == []
    real = sampler_for(discover_nvml())
    assert isinstance(real, NvmlSampler)
    real.close()


def test_sampler_for_refuses_no_devices_and_a_mix(nvml: FakeNvml) -> None:
    with pytest.raises(ValueError, match="no GPU devices"):
        sampler_for([])
    mixed = [*parse_fake_gpus("A100:80", host="h"), real_device(H100, 0)]
    with pytest.raises(ValueError, match="simulated and real"):
        sampler_for(mixed)


def test_module_imports_no_nvml_or_torch_at_import_time() -> None:
    # pynvml and torch are imported lazily: the API and no-GPU hosts import this module freely
    source = Path(devices.__file__).read_text(encoding="utf-8")
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "pynvml" in line or "torch" in line]


# --- health of a suspect device -----------------------------------------------------------


def test_a_real_gpu_that_answers_with_nothing_pending_is_healthy(nvml: FakeNvml) -> None:
    # Given an H100 (row remapping, no page retirement) and an A100 that reports neither
    nvml.remapped_rows[0] = (2, 0, 0, 0)
    # Then both are healthy, saying what was checked, and NVML is shut down again
    h100 = devices.check_health(real_device(H100, 0))
    assert h100 == devices.Health(True, "answers, no row remapping pending")
    assert devices.check_health(real_device(A100, 1)) == devices.Health(True, "answers")
    assert nvml.initialised == 0


@pytest.mark.parametrize(
    ("pages", "rows", "problem"),
    [
        (1, None, "retired pages are pending"),
        (None, (0, 1, 1, 0), "row remapping is pending"),
        (None, (0, 8, 0, 1), "row remapping failed"),
    ],
)
def test_pending_memory_repairs_keep_a_gpu_unhealthy(
    nvml: FakeNvml, pages: int | None, rows: tuple[int, int, int, int] | None, problem: str
) -> None:
    if pages is not None:
        nvml.pages_pending[0] = pages
    if rows is not None:
        nvml.remapped_rows[0] = rows
    found = devices.check_health(real_device(H100, 0))
    assert not found.healthy and problem in found.detail
    assert nvml.initialised == 0


def test_a_lost_gpu_or_a_missing_driver_is_unhealthy(nvml: FakeNvml) -> None:
    nvml.failures[("nvmlDeviceGetMemoryInfo", 0)] = NVMLError_GpuIsLost
    lost = devices.check_health(real_device(H100, 0))
    assert not lost.healthy and "GPU is lost" in lost.detail
    gone = devices.check_health(dataclasses.replace(real_device(H100, 0), uuid="GPU-not-here"))
    assert not gone.healthy
    nvml.init_error = NVMLError_DriverNotLoaded
    assert not devices.check_health(real_device(A100, 1)).healthy


def test_a_simulated_gpu_is_healthy_unless_set_unhealthy() -> None:
    (gpu,) = parse_fake_gpus("A100:80", host="h")
    assert devices.check_health(gpu).healthy
    assert not devices.check_health(gpu, fake_unhealthy=devices.parse_unhealthy("0")).healthy
    assert devices.parse_unhealthy(" 0, 2 ") == frozenset({0, 2})
    assert devices.parse_unhealthy("") == frozenset()
