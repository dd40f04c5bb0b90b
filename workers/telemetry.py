"""GPU utilization sampling and publishing, from the worker's main process.

Every ``telemetry_interval``: sample the claimed device (NVML, or simulated numbers marked
``simulated``), store the sample on the device row and fold it into the running job's peak
memory and mean utilization, and send a Celery event so Flower shows it. (Samples were also
published on a Redis pub/sub channel that nothing read: one Redis command per GPU per interval
for no one. The API's ``/v1/fleet`` and ``/metrics`` read the stored sample.)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.db import devices as device_rows
from app.db.session import session_scope
from app.settings import Settings
from workers.claim import take_worker_down
from workers.devices import GpuDevice, Sampler

log = logging.getLogger(__name__)

CELERY_EVENT = "gpufleet-gpu-sample"


class TelemetryLoop(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        device: GpuDevice,
        worker: str,
        sampler: Sampler,
        celery_app: Any = None,
    ) -> None:
        super().__init__(name="telemetry", daemon=True)
        self.settings = settings
        self.device = device
        self.worker = worker
        self.sampler = sampler
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
        busy = self._busy()
        sample = self.sampler.sample(self.device, busy=busy).as_dict()
        sample["taken_at"] = time.time()
        try:
            with session_scope(self.settings.database_url) as session:
                device_rows.record_sample(
                    session=session, uuid=self.device.uuid, worker=self.worker, sample=sample
                )
        except SQLAlchemyError as exc:
            log.warning("could not store a GPU sample: %s", exc)
        message = {"device": self.device.uuid, "host": self.settings.hostname, **sample}
        self._celery_event(message)
        self.samples_taken += 1
        return sample

    def _busy(self) -> bool:
        try:
            with session_scope(self.settings.database_url) as session:
                return device_rows.current_job(session=session, uuid=self.device.uuid) is not None
        except SQLAlchemyError:
            return False

    def _celery_event(self, message: dict[str, Any]) -> None:
        if self.celery_app is None:
            return
        try:
            with self.celery_app.events.default_dispatcher(hostname=self.worker) as dispatcher:
                dispatcher.send(CELERY_EVENT, **message)
        except Exception as exc:  # Flower is a nicety; never let it stop the loop
            log.debug("could not send a Celery telemetry event: %s", exc)
