"""Prometheus metrics read from Postgres at scrape time (DCGM-like names for device gauges).

Reading at scrape time keeps every API replica's answer the same and the truth in one place;
a scrape reads the fleet counters (``app.db.counters``) and the device rows, whatever the history.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from app.db.devices import list_devices
from app.db.fleet import event_counts, job_counts, queue_depths
from app.db.session import session_scope
from app.domain.states import EventKind
from app.settings import Settings

MIB = 2**20
_DEVICE_LABELS = ["gpu", "uuid", "host", "type", "simulated"]


class FleetCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.settings.database_url) as session:
            jobs = job_counts(session=session)
            depths = queue_depths(session=session)
            events = event_counts(
                session=session, kinds=[EventKind.LEASE_EXPIRED, EventKind.OOM_BACKOFF]
            )
            devices = list_devices(session=session)
        by_status = GaugeMetricFamily("gpufleet_jobs", "Jobs by status.", labels=["status"])
        for status, count in jobs.items():
            by_status.add_metric([status], count)
        yield by_status
        depth = GaugeMetricFamily(
            "gpufleet_queue_depth", "Queued jobs per queue (Postgres).", labels=["queue"]
        )
        for queue, count in sorted(depths.items()):
            depth.add_metric([queue], count)
        yield depth
        yield CounterMetricFamily(
            "gpufleet_lease_reaps",
            "Leases the reaper took back.",
            value=events[EventKind.LEASE_EXPIRED.value],
        )
        yield CounterMetricFamily(
            "gpufleet_oom_backoffs",
            "Micro-batch halvings after out-of-memory.",
            value=events[EventKind.OOM_BACKOFF.value],
        )
        yield from self._devices(devices)

    def _devices(self, devices: list[dict[str, object]]) -> Iterator[Metric]:
        gauges = {
            "util": GaugeMetricFamily(
                "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (%).", labels=_DEVICE_LABELS
            ),
            "used": GaugeMetricFamily(
                "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (MiB).", labels=_DEVICE_LABELS
            ),
            "free": GaugeMetricFamily(
                "DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (MiB).", labels=_DEVICE_LABELS
            ),
            "temp": GaugeMetricFamily(
                "DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C).", labels=_DEVICE_LABELS
            ),
            "power": GaugeMetricFamily(
                "DCGM_FI_DEV_POWER_USAGE", "Power draw (W).", labels=_DEVICE_LABELS
            ),
        }
        busy = GaugeMetricFamily(
            "gpufleet_device_busy", "1 when the device runs a job.", labels=_DEVICE_LABELS
        )
        suspect = GaugeMetricFamily(
            "gpufleet_device_suspect",
            "1 while the device is suspect after a GPU fault (it takes no job).",
            labels=_DEVICE_LABELS,
        )
        for d in devices:
            if not d["alive"]:
                continue
            labels = [
                str(d["index"]),
                str(d["uuid"]),
                str(d["host"]),
                str(d["type"]),
                str(d["simulated"]).lower(),
            ]
            busy.add_metric(labels, 1.0 if d["current_job"] else 0.0)
            suspect.add_metric(labels, 1.0 if d["suspect"] else 0.0)
            sample = d["sample"]
            if not isinstance(sample, dict):
                continue
            used, total = sample.get("memory_used_bytes"), sample.get("memory_total_bytes")
            gauges["util"].add_metric(labels, float(sample.get("utilization") or 0) * 100)
            if isinstance(used, int) and isinstance(total, int):
                gauges["used"].add_metric(labels, used / MIB)
                gauges["free"].add_metric(labels, (total - used) / MIB)
            if sample.get("temperature_c") is not None:
                gauges["temp"].add_metric(labels, float(sample["temperature_c"]))
            if sample.get("power_w") is not None:
                gauges["power"].add_metric(labels, float(sample["power_w"]))
        yield busy
        yield suspect
        yield from gauges.values()


def make_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(settings))
    return registry
