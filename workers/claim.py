"""A worker claims one device of its host, and keeps it while it lives.

Devices are leased like jobs: a row claimed with ``FOR UPDATE SKIP LOCKED``, kept by a
heartbeat, free again once the heartbeat stops. N identical replicas on one host (``docker
compose up --scale worker=N``) therefore take N different GPUs, and the N+1st waits, saying why.

The keeper also looks after the device's health: while the device is suspect (a job on it
failed with a GPU or driver fault), each heartbeat runs a health check
(``workers.devices.check_health``), the worker stops taking jobs (``on_suspect``), and the
first check that passes clears the suspicion.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from app import health
from app.db import devices as device_rows
from app.db.session import session_scope
from app.settings import Settings
from workers.devices import GpuDevice, Health, check_health, parse_unhealthy
from workers.handoff import Handoff
from workers.watchdog import Deadline, retry_delay

log = logging.getLogger(__name__)

#: how often a waiting worker tries again, and how often it says why it waits.
CLAIM_RETRY_S = 1.0
WAIT_NOTICE_S = 10.0


def as_record(device: GpuDevice, host: str) -> device_rows.DeviceRecord:
    return device_rows.DeviceRecord(
        uuid=device.uuid,
        host=host,
        index=device.index,
        name=device.name,
        gpu_type=device.gpu_type,
        memory_bytes=device.memory_bytes,
        pci_bus_id=device.pci_bus_id,
        simulated=device.simulated,
    )


def register(settings: Settings, devices: list[GpuDevice]) -> None:
    with session_scope(settings.database_url) as session:
        device_rows.register_devices(
            session=session, devices=[as_record(d, settings.hostname) for d in devices]
        )


def claim_one(
    settings: Settings,
    devices: list[GpuDevice],
    worker: str,
    *,
    frameworks: Mapping[str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> GpuDevice | None:
    """Block until one of ``devices`` is claimed (or ``should_stop``), recording the
    ``frameworks`` this worker offers on it. Says why it waits."""
    by_uuid = {d.uuid: d for d in devices}
    last_notice = 0.0
    while not should_stop():
        try:
            with session_scope(settings.database_url) as session:
                claimed = device_rows.claim_device(
                    session=session,
                    uuids=list(by_uuid),
                    worker=worker,
                    ttl=settings.lease_ttl,
                    frameworks=frameworks,
                )
                holders = (
                    {} if claimed else device_rows.holders(session=session, uuids=list(by_uuid))
                )
        except SQLAlchemyError as exc:
            log.warning("cannot reach the database to claim a device: %s", exc)
            claimed, holders = None, {}
        if claimed is not None:
            return by_uuid[claimed]
        if time.monotonic() - last_notice >= WAIT_NOTICE_S:
            last_notice = time.monotonic()
            held = ", ".join(
                f"{d.gpu_type}#{d.index} by {holders.get(u)}" for u, d in by_uuid.items()
            )
            log.warning(
                "waiting for a device: all %d GPUs of host %s are held by live workers (%s)",
                len(devices),
                settings.hostname,
                held,
            )
        time.sleep(CLAIM_RETRY_S)
    return None


def rename_claim(settings: Settings, device: GpuDevice, *, old: str, new: str) -> None:
    """Name the claim after the Celery node once we know which device we got."""
    with session_scope(settings.database_url) as session:
        if not device_rows.rename_claim(session=session, uuid=device.uuid, old=old, new=new):
            raise RuntimeError(f"lost the claim on {device.uuid} right after taking it")


def release(settings: Settings, device: GpuDevice, worker: str) -> None:
    try:
        with session_scope(settings.database_url) as session:
            device_rows.release_device(session=session, uuid=device.uuid, worker=worker)
    except SQLAlchemyError as exc:  # it expires by itself
        log.warning("could not release device %s: %s", device.uuid, exc)


def take_worker_down(reason: str) -> None:
    """A worker that lost its device, or whose keeper thread died, must not go on taking jobs."""
    log.critical("stopping this worker: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)
    # Celery's warm shutdown waits for the running job. Its supervisor sees the lost claim on
    # its next heartbeat and hands the job back (runner.DeviceLost); this is the backstop.
    threading.Timer(60.0, lambda: os._exit(70)).start()


class DeviceKeeper(threading.Thread):
    """Renews the device claim every heartbeat interval; losing it stops the worker, loudly.

    A deadline of its own stops the worker too when no renewal succeeded for
    ``lease_ttl - 2 * heartbeat_interval``, even if this thread is stuck in a database call:
    by then another worker may claim the device.

    While the device is suspect, each renewal also runs the health check; ``on_suspect(True)``
    is called when the keeper sees the suspicion and ``on_suspect(False)`` once it is cleared
    (the worker stops and resumes consuming its queues), again each heartbeat until it returns
    True (the Celery consumer may not be up yet). The check runs on this thread: NVML reads are
    quick, and a GPU that hangs them takes the worker down through the deadline, which is what
    should happen to it.

    One write per heartbeat: an idle device's renewal stores the latest GPU sample and reads
    the suspicion back in the same statement; while a job runs, its lease's heartbeat renews
    the claim (``handoff``, see ``workers.handoff``) and the keeper writes nothing.
    """

    def __init__(
        self,
        settings: Settings,
        device: GpuDevice,
        worker: str,
        *,
        on_suspect: Callable[[bool], bool] = lambda _: True,
        health_check: Callable[[GpuDevice], Health] | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        super().__init__(name="device-keeper", daemon=True)
        self.handoff = handoff
        self.settings = settings
        self.device = device
        self.worker = worker
        self.on_suspect = on_suspect
        unhealthy = parse_unhealthy(settings.fake_unhealthy_gpus)
        self.health_check = health_check or (lambda d: check_health(d, fake_unhealthy=unhealthy))
        #: whether this keeper last saw the device suspect.
        self.suspect = False
        #: the last state ``on_suspect`` confirmed (it returns False when it could not act).
        self._applied = False
        self._last_health: str | None = None
        self.stopping = threading.Event()
        self.deadline = Deadline(
            budget=settings.lease_ttl - 2 * settings.heartbeat_interval,
            on_expire=lambda: take_worker_down(
                f"no renewal of the claim on device {device.uuid} in time"
            ),
            name="device-watchdog",
        )

    def stop(self) -> None:
        self.deadline.stop()
        self.stopping.set()

    def run(self) -> None:
        self.deadline.start()
        try:
            wait = self.settings.heartbeat_interval
            while not self.stopping.wait(wait):
                wait = self.settings.heartbeat_interval
                if self.renewed_by_lease():
                    continue
                renewal = self._renew()
                if renewal is False:
                    take_worker_down(f"lost the claim on device {self.device.uuid}")
                    return
                if renewal is None:  # the database did not answer: try again soon
                    wait = retry_delay(self.settings.heartbeat_interval)
                    continue
                self.look_after_health(renewal)
        except Exception as exc:
            log.exception("device keeper crashed")
            take_worker_down(f"device keeper crashed: {exc!r}")

    def renewed_by_lease(self) -> bool:
        """Whether the running job's lease heartbeat renewed the claim within the last
        interval and a half (then this keeper writes nothing, and its deadline is met)."""
        if self.handoff is None:
            return False
        if not self.handoff.renewed_within(1.5 * self.settings.heartbeat_interval):
            return False
        self.deadline.renew()
        health.touch("worker")
        return True

    def _renew(self) -> device_rows.Renewal | Literal[False] | None:
        """Renew the claim, storing the latest GPU sample: the renewal when kept, False when
        lost, None when the database did not answer."""
        sample = self.handoff.take_sample() if self.handoff is not None else None
        try:
            with session_scope(self.settings.database_url) as session:
                renewal = device_rows.renew_claim(
                    session=session,
                    uuid=self.device.uuid,
                    worker=self.worker,
                    ttl=self.settings.lease_ttl,
                    sample=sample,
                )
        except SQLAlchemyError as exc:  # the deadline decides when this means giving up
            log.warning(
                "device heartbeat failed (%.1fs without renewal): %s", self.deadline.silent_for, exc
            )
            return None
        if renewal is None:
            return False
        self.deadline.renew()
        health.touch("worker")
        return renewal

    def look_after_health(self, renewal: device_rows.Renewal | None = None) -> None:
        """If the device is suspect, check it; clear the suspicion when the check passes.
        ``renewal``: what the heartbeat just read (None: read the suspicion now)."""
        uuid = self.device.uuid
        if renewal is not None:
            suspicion = renewal.suspicion
        else:
            try:
                with session_scope(self.settings.database_url) as session:
                    suspicion = device_rows.suspicion(session=session, uuid=uuid)
            except SQLAlchemyError as exc:  # the next heartbeat tries again
                log.warning("cannot read the health state of device %s: %s", uuid, exc)
                return
        if suspicion is None:
            self._set_suspect(False)
            return
        self._set_suspect(True, suspicion.reason)
        result = self.health_check(self.device)
        if not result.healthy:
            if result.detail != self._last_health:
                log.error("device %s is still unhealthy: %s", uuid, result.detail)
            self._last_health = result.detail
            return
        try:
            with session_scope(self.settings.database_url) as session:
                cleared = device_rows.clear_suspect(
                    session=session, uuid=uuid, worker=self.worker, since=suspicion.since
                )
        except SQLAlchemyError as exc:
            log.warning("cannot clear the suspicion of device %s: %s", uuid, exc)
            return
        if cleared:
            log.warning(
                "device %s passed its health check (%s); suspect since %s (%s): cleared",
                uuid,
                result.detail,
                suspicion.since.isoformat(),
                suspicion.reason,
            )
            self._set_suspect(False)

    def _set_suspect(self, suspect: bool, reason: str = "") -> None:
        if suspect != self.suspect:
            self.suspect = suspect
            self._last_health = None
            if suspect:
                log.error(
                    "device %s is suspect (%s): taking no jobs until its health check passes",
                    self.device.uuid,
                    reason,
                )
        # Tried again each heartbeat until the worker could do it.
        if self._applied != suspect and self.on_suspect(suspect):
            self._applied = suspect
