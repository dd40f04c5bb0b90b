"""GPU utilization sampling and publishing, from the worker's main process.

Every ``telemetry_interval``: sample the claimed device (NVML, or simulated numbers marked
``simulated``), hand the sample over (``workers.handoff``) and send a Celery event so Flower
shows it. The sample reaches the database with the next heartbeat, at no write of its own: the
running job's lease heartbeat stores it on the device row and folds it into the job's peak
memory and mean utilization; an idle device's keeper stores it with the claim's renewal. The
API's ``/v1/fleet`` and ``/metrics`` read the stored sample, at most one heartbeat old. (Samples
were also published on a Redis pub/sub channel that nothing read: removed.)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.settings import Settings
from workers.claim import take_worker_down
from workers.devices import GpuDevice, Sampler
from workers.handoff import Handoff

log = logging.getLogger(__name__)

CELERY_EVENT = "gpufleet-gpu-sample"


class TelemetryLoop(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        device: GpuDevice,
        worker: str,
        sampler: Sampler,
        handoff: Handoff,
        celery_app: Any = None,
    ) -> None:
        super().__init__(name="telemetry", daemon=True)
        self.settings = settings
        self.device = device
        self.worker = worker
        self.sampler = sampler
        self.handoff = handoff
        self.celery_app = celery_app
        self.stopping = threading.Event()
        self.samples_taken = 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                self.sample_once()
                self.stopping.wait(
                    max(0.0, self.settings.telemetry_interval - (time.monotonic() - started))
                )
        except Exception as exc:
            log.exception("telemetry loop crashed")
            take_worker_down(f"telemetry loop crashed: {exc!r}")

    def sample_once(self) -> dict[str, Any] | None:
        # Busy while a lease is held (no database read to know it).
        busy = self.handoff.renewed_within(1.5 * self.settings.heartbeat_interval)
        sample = self.sampler.sample(self.device, busy=busy).as_dict()
        sample["taken_at"] = time.time()
        self.handoff.put_sample(sample)
        message = {"device": self.device.uuid, "host": self.settings.hostname, **sample}
        self._celery_event(message)
        self.samples_taken += 1
        return sample

    def _celery_event(self, message: dict[str, Any]) -> None:
        if self.celery_app is None:
            return
        try:
            with self.celery_app.events.default_dispatcher(hostname=self.worker) as dispatcher:
                dispatcher.send(CELERY_EVENT, **message)
        except Exception as exc:  # Flower is a nicety; never let it stop the loop
            log.debug("could not send a Celery telemetry event: %s", exc)
