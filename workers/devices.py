"""The GPUs of this host: discovery through NVML (or a simulated list) and telemetry samplers.

A worker lists its host's devices with :func:`discover` and claims one. Without an NVIDIA driver,
``GPUFLEET_FAKE_GPUS="A100:80,T4:16"`` declares simulated devices so the whole system runs on a
machine with no GPU; everything measured on them is marked ``simulated``.

``pynvml`` (the ``nvidia-ml-py`` package) is imported inside the functions that need it, so this
module imports on any machine and never touches CUDA.
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import re
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Protocol

logger = logging.getLogger(__name__)

GIB = 2**30

FAKE_GPUS_VARIABLE = "GPUFLEET_FAKE_GPUS"
FAKE_GPUS_FORMAT = "TYPE:GB,TYPE:GB (e.g. A100:80,T4:16)"

#: Longest type name a queue accepts (``app.domain.routing``).
MAX_TYPE_LENGTH = 32

#: Words in front of the model in NVML product names ("NVIDIA GeForce RTX 4090").
_VENDOR_WORDS = frozenset({"NVIDIA", "TESLA", "GEFORCE", "QUADRO", "GRID", "SIMULATED"})
#: Words after the model that name a different card ("RTX 3090 Ti", "RTX 6000 Ada Generation").
_VARIANT_WORDS = frozenset({"TI", "SUPER", "ADA"})
_NOT_ALNUM = re.compile(r"[^A-Z0-9]+")
_TYPE_OK = re.compile(r"^[A-Z0-9]+$")

#: Board power of simulated devices, in watts; other types get the default.
_SIMULATED_TDP_W = {
    "H200": 700.0,
    "H100": 700.0,
    "A100": 400.0,
    "V100": 300.0,
    "L40S": 350.0,
    "A10G": 150.0,
    "L4": 72.0,
    "T4": 70.0,
    "RTX4090": 450.0,
}
_DEFAULT_TDP_W = 300.0


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver/NVML on this host"""

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        message = self.__doc__ or type(self).__name__
        super().__init__(f"{message}: {detail}" if detail else message)


@dataclass(frozen=True)
class GpuDevice:
    #: NVML index (PCI bus order).
    index: int
    #: NVML UUID ("GPU-...") or a stable simulated one.
    uuid: str
    #: Product name as reported ("NVIDIA A100-SXM4-80GB"), or "Simulated A100".
    name: str
    #: Normalised type used in queue names: only [A-Z0-9] (A100, H100, L40S, RTX4090, ...).
    gpu_type: str
    #: Total memory as measured by NVML (an "80 GB" H100 reports 79.6 GiB).
    memory_bytes: int
    #: "00000000:3B:00.0"; simulated devices: "sim:<index>".
    pci_bus_id: str
    simulated: bool

    def __post_init__(self) -> None:
        if not _TYPE_OK.match(self.gpu_type):
            raise ValueError(f"gpu_type {self.gpu_type!r} must be upper-case letters and digits")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


@dataclass(frozen=True)
class GpuSample:
    #: GPU busy fraction over NVML's last sample period, 0..1.
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    #: None where the device does not report it.
    temperature_c: float | None
    #: None where the device does not report it.
    power_w: float | None
    simulated: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "utilization": self.utilization,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "simulated": self.simulated,
        }


def normalize_gpu_type(product_name: str) -> str:
    """``"NVIDIA A100-SXM4-80GB"`` -> ``"A100"``, ``"NVIDIA GeForce RTX 4090"`` -> ``"RTX4090"``.

    The model is the first word with a digit once vendor words are dropped, joined with the
    words before it ("RTX A6000" -> RTXA6000) and a variant word after it ("RTX 3090 Ti" ->
    RTX3090TI). A name with no such word becomes its letters and digits (TITANRTX). The result
    is only [A-Z0-9], at most 32 characters, and never empty.
    """
    words = [w for w in _NOT_ALNUM.split(product_name.upper()) if w]
    while words and words[0] in _VENDOR_WORDS:
        words = words[1:]
    model_at = next((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), None)
    if model_at is not None:
        parts = words[: model_at + 1]
        if model_at + 1 < len(words) and words[model_at + 1] in _VARIANT_WORDS:
            parts.append(words[model_at + 1])
        words = parts
    token = "".join(words) or _NOT_ALNUM.sub("", product_name.upper()) or "UNKNOWN"
    return token[:MAX_TYPE_LENGTH]


def _fake_spec_error(spec: str, problem: str) -> ValueError:
    return ValueError(f"{FAKE_GPUS_VARIABLE}={spec!r}: {problem}; expected {FAKE_GPUS_FORMAT}")


def _sanitize_uuid(raw: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9-]", "-", raw)).strip("-")


def parse_fake_gpus(spec: str, *, host: str) -> list[GpuDevice]:
    """Simulated devices from ``"A100:80,T4:16"`` (type and memory in GB, GB = 2**30 bytes)."""
    if not spec.strip():
        raise _fake_spec_error(spec, "no devices declared")
    devices: list[GpuDevice] = []
    for index, entry in enumerate(spec.split(",")):
        type_text, sep, memory_text = (part.strip() for part in entry.partition(":"))
        if not sep or not type_text or not memory_text:
            raise _fake_spec_error(spec, f"entry {entry.strip()!r} is not TYPE:GB")
        if not re.fullmatch(r"[A-Za-z0-9 _-]+", type_text):
            raise _fake_spec_error(spec, f"type {type_text!r} is not letters and digits")
        gpu_type = normalize_gpu_type(type_text)
        if gpu_type == "ANY":
            raise _fake_spec_error(spec, "'any' is a queue name, not a GPU type")
        try:
            gigabytes = float(memory_text)
        except ValueError:
            raise _fake_spec_error(spec, f"memory {memory_text!r} is not a number") from None
        if not math.isfinite(gigabytes) or gigabytes <= 0:
            raise _fake_spec_error(spec, f"memory {memory_text!r} must be a positive number")
        devices.append(
            GpuDevice(
                index=index,
                uuid=_sanitize_uuid(f"GPU-sim-{host}-{index}-{gpu_type}"),
                name=f"Simulated {gpu_type}",
                gpu_type=gpu_type,
                memory_bytes=round(gigabytes * GIB),
                pci_bus_id=f"sim:{index}",
                simulated=True,
            )
        )
    return devices


def _import_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable(f"the nvidia-ml-py package is not installed ({exc})") from exc


def _nvml_init(pynvml: ModuleType) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _text(value: bytes | str) -> str:
    """NVML strings are bytes in old nvidia-ml-py versions and str in new ones."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.rstrip("\x00").strip()


def discover_nvml() -> list[GpuDevice]:
    """The NVIDIA GPUs of this host, in NVML index (PCI bus) order.

    Raises :class:`NvmlUnavailable` when the package, library or driver is missing. A device
    NVML cannot describe (a GPU fallen off the bus) is skipped with a warning, as nvidia-smi
    does; the others keep their indexes.
    """
    pynvml = _import_pynvml()
    _nvml_init(pynvml)
    try:
        devices: list[GpuDevice] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                memory_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
                pci_bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
            except pynvml.NVMLError as exc:
                logger.warning("skipping GPU %d: NVML cannot describe it (%s)", index, exc)
                continue
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=uuid,
                    name=name,
                    gpu_type=normalize_gpu_type(name),
                    memory_bytes=memory_bytes,
                    pci_bus_id=pci_bus_id,
                    simulated=False,
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def discover(*, fake_gpus: str | None, host: str) -> list[GpuDevice]:
    """Simulated devices when ``fake_gpus`` is set (non-blank), else NVML's; [] without a driver."""
    if fake_gpus is not None and fake_gpus.strip():
        devices = parse_fake_gpus(fake_gpus, host=host)
        logger.info(
            "using %d simulated GPU(s) from %s=%s: %s",
            len(devices),
            FAKE_GPUS_VARIABLE,
            fake_gpus,
            ", ".join(f"{d.gpu_type} {d.memory_gib:g} GiB" for d in devices),
        )
        return devices
    try:
        return discover_nvml()
    except NvmlUnavailable as exc:
        logger.warning(
            "no NVIDIA driver/NVML: %s; set %s=A100:80,T4:16 to simulate devices",
            exc.detail or exc,
            FAKE_GPUS_VARIABLE,
        )
        return []


class Sampler(Protocol):
    def sample(self, device: GpuDevice, *, busy: bool) -> GpuSample: ...


class NvmlSampler:
    """Samples real devices; NVML stays initialised from construction until :meth:`close`.

    Raises :class:`NvmlUnavailable` at construction without a driver. Utilization and memory
    errors propagate (the device is in trouble); temperature and power a device does not report
    are None.
    """

    def __init__(self) -> None:
        self._nvml = _import_pynvml()
        _nvml_init(self._nvml)
        self._handles: dict[str, Any] = {}
        self._closed = False

    def __enter__(self) -> NvmlSampler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._handles.clear()
            self._nvml.nvmlShutdown()

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is None:
            # nvmlDeviceGetHandleByUUID hands its argument to ctypes.c_char_p: bytes only.
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            self._handles[uuid] = handle
        return handle

    def _optional(self, read: Any, *args: Any) -> float | None:
        try:
            return float(read(*args))
        except self._nvml.NVMLError as exc:
            logger.debug("NVML %s unavailable: %s", getattr(read, "__name__", read), exc)
            return None

    def sample(self, device: GpuDevice, *, busy: bool) -> GpuSample:
        if self._closed:
            raise RuntimeError("NvmlSampler is closed")
        if device.simulated:
            raise ValueError(f"GPU {device.uuid} is simulated; sample it with SimulatedSampler")
        nvml = self._nvml
        handle = self._handle(device.uuid)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        temperature = self._optional(
            nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        milliwatts = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        return GpuSample(
            utilization=min(max(float(utilization), 0.0), 1.0),
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            temperature_c=temperature,
            power_w=None if milliwatts is None else milliwatts / 1000,
            simulated=False,
        )


class SimulatedSampler:
    """Plausible numbers for simulated devices, following whether the device has a job.

    Busy: utilization 0.85-0.95, 30-60% of memory used, 60-78 C, 70-90% of board power.
    Idle: utilization 0.00-0.03, 256-512 MiB used, 30-40 C, 8-15% of board power.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def sample(self, device: GpuDevice, *, busy: bool) -> GpuSample:
        rng = self._rng
        total = device.memory_bytes
        tdp = _SIMULATED_TDP_W.get(device.gpu_type, _DEFAULT_TDP_W)
        if busy:
            utilization = rng.uniform(0.85, 0.95)
            used = round(total * rng.uniform(0.30, 0.60))
            temperature = rng.uniform(60.0, 78.0)
            power = tdp * rng.uniform(0.70, 0.90)
        else:
            utilization = rng.uniform(0.0, 0.03)
            used = min(total, round(rng.uniform(256, 512) * 2**20))
            temperature = rng.uniform(30.0, 40.0)
            power = tdp * rng.uniform(0.08, 0.15)
        return GpuSample(
            utilization=round(utilization, 4),
            memory_used_bytes=used,
            memory_total_bytes=total,
            temperature_c=round(temperature, 1),
            power_w=round(power, 1),
            simulated=True,
        )


def sampler_for(devices: list[GpuDevice]) -> Sampler:
    """SimulatedSampler for simulated devices, NvmlSampler (NVML initialised) for real ones."""
    if not devices:
        raise ValueError("no GPU devices to sample")
    simulated = {d.simulated for d in devices}
    if simulated == {True}:
        return SimulatedSampler()
    if simulated == {False}:
        return NvmlSampler()
    raise ValueError("cannot sample simulated and real GPUs with one sampler")


@dataclass(frozen=True)
class Health:
    healthy: bool
    #: what was checked, or what failed.
    detail: str


def parse_unhealthy(spec: str) -> frozenset[int]:
    """``GPUFLEET_FAKE_UNHEALTHY_GPUS="0,2"`` -> the simulated indexes whose check fails."""
    return frozenset(int(part) for part in spec.split(",") if part.strip())


def check_health(device: GpuDevice, *, fake_unhealthy: frozenset[int] = frozenset()) -> Health:
    """Whether a suspect device may run jobs again.

    A simulated device is healthy unless its index is in ``fake_unhealthy``. A real one is
    asked through NVML (:func:`nvml_health`).
    """
    if device.simulated:
        if device.index in fake_unhealthy:
            return Health(False, f"simulated GPU {device.index} set unhealthy (fault injection)")
        return Health(True, "simulated GPU")
    return nvml_health(device.uuid)


def nvml_health(uuid: str) -> Health:
    """Ask NVML whether the GPU is usable: cheap reads, no CUDA context.

    - the driver still answers for it (``nvmlDeviceGetHandleByUUID``, its memory and PCI info):
      a GPU fallen off the bus or lost (Xid 79) fails here;
    - no page is waiting to be retired (``nvmlDeviceGetRetiredPagesPendingStatus``, before
      Ampere) and no row remapping is pending or has failed (``nvmlDeviceGetRemappedRows``,
      Ampere and later): after an uncorrectable ECC error the GPU needs a reset before its
      memory can be trusted. A check the GPU does not support is skipped.

    Xid events are not read: NVML delivers them only to a listener registered before they
    happen, and their effects that matter here show in the reads above.
    """
    try:
        nvml = _import_pynvml()
        _nvml_init(nvml)
    except NvmlUnavailable as exc:
        return Health(False, str(exc))
    try:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            nvml.nvmlDeviceGetMemoryInfo(handle)
            nvml.nvmlDeviceGetPciInfo(handle)
        except nvml.NVMLError as exc:
            return Health(False, f"NVML cannot reach {uuid}: {exc}")
        checked = ["answers"]
        try:
            pending = nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)
        except nvml.NVMLError as exc:
            logger.debug("%s: retired pages not reported: %s", uuid, exc)
        else:
            if pending:
                return Health(False, "retired pages are pending: the GPU needs a reset")
            checked.append("no retired pages pending")
        try:
            _, _, remap_pending, remap_failed = nvml.nvmlDeviceGetRemappedRows(handle)
        except nvml.NVMLError as exc:
            logger.debug("%s: remapped rows not reported: %s", uuid, exc)
        else:
            if remap_failed:
                return Health(False, "a row remapping failed: the GPU's memory is failing")
            if remap_pending:
                return Health(False, "a row remapping is pending: the GPU needs a reset")
            checked.append("no row remapping pending")
        return Health(True, ", ".join(checked))
    finally:
        nvml.nvmlShutdown()
