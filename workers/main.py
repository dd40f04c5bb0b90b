"""``gpufleet worker``: claim one GPU of this host, then consume the queues that fit it and
the frameworks it has; stop consuming while the GPU is suspect."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import tenacity
from sqlalchemy.exc import OperationalError

from app.domain.routing import device_queues
from app.settings import Settings, get_settings
from workers import claim, drain, frameworks, handoff, identity
from workers.devices import GpuDevice, discover, sampler_for
from workers.telemetry import TelemetryLoop

log = logging.getLogger(__name__)

#: seconds to wait for the worker's own answer to a pause/resume request.
CONTROL_REPLY_S = 2.0


class NoDevices(RuntimeError):
    """This host has no GPU (no NVIDIA driver) and GPUFLEET_FAKE_GPUS is not set"""


class NoFrameworks(RuntimeError):
    """This worker can import no training framework (torch, tensorflow): it could run no job"""


class QueueGate:
    """Stops this worker consuming its queues while its device is suspect, and resumes.

    It goes through Celery's remote control, addressed to this worker alone: the request is
    carried out in the consumer's own loop (kombu is not thread-safe), and a wake-up already
    in the queue stays there for a healthy worker. Returns False when the worker did not
    answer (not started yet); the keeper asks again at its next heartbeat.
    """

    def __init__(self, app: Any, worker: str, queues: list[str]) -> None:
        self.app = app
        self.worker = worker
        self.queues = queues

    def __call__(self, suspect: bool) -> bool:
        control = self.app.control
        try:
            for queue in self.queues:
                send = control.cancel_consumer if suspect else control.add_consumer
                if not send(queue, destination=[self.worker], reply=True, timeout=CONTROL_REPLY_S):
                    return False
        except Exception as exc:  # the broker is down: try again at the next heartbeat
            log.warning("could not %s consuming: %s", "stop" if suspect else "resume", exc)
            return False
        log.warning("%s consuming %s", "stopped" if suspect else "resumed", ",".join(self.queues))
        return True


def worker_name(settings: Settings, device: GpuDevice) -> str:
    """Celery node name: unique per device, readable in Flower (``A100-0@host``)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", settings.hostname)
    return f"{device.gpu_type}-{device.index}@{host}"


def pin_device(device: GpuDevice) -> None:
    """Make the claimed GPU the only one CUDA sees, before anything touches CUDA."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if not device.simulated:
        os.environ["CUDA_VISIBLE_DEVICES"] = device.uuid


def _wait_for_database(step: Callable[[], None]) -> None:
    """Run a start-up step, waiting for the database as long as it takes: a worker started (or
    restarted by ``gpufleet up``) during an outage must be ready the moment it ends, not dead."""
    tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(OperationalError),
        wait=tenacity.wait_exponential(multiplier=0.5, max=2.0),
        before_sleep=lambda state: log.warning(
            "waiting for the database: %s", state.outcome and state.outcome.exception()
        ),
        reraise=True,
    )(step)


#: a worker process's keeper, telemetry and supervisor threads share one pooled connection
#: (plus a small overflow) instead of the API's pool; an operator's own values win.
WORKER_DB_POOL = {
    "GPUFLEET_DB_POOL_SIZE": "1",
    "GPUFLEET_DB_MAX_OVERFLOW": "2",
    "GPUFLEET_DB_APPLICATION_NAME": "gpufleet-worker",
}


def use_worker_pool() -> None:
    """Give this process the worker's small pool; call before any engine is built."""
    for name, value in WORKER_DB_POOL.items():
        os.environ.setdefault(name, value)
    get_settings.cache_clear()  # the CLI has read the settings before


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> int:
    use_worker_pool()
    try:
        devices = discover(fake_gpus=settings.fake_gpus or None, host=settings.hostname)
    except ValueError as exc:  # a GPUFLEET_FAKE_GPUS the parser refuses
        raise NoDevices(str(exc)) from None
    if not devices:
        raise NoDevices(NoDevices.__doc__)
    try:
        offered = frameworks.offered(settings.worker_frameworks, frameworks.installed())
    except frameworks.FrameworksError as exc:
        raise NoFrameworks(str(exc)) from None
    if not offered:
        raise NoFrameworks(NoFrameworks.__doc__)
    _wait_for_database(lambda: claim.register(settings, devices))
    pending_name = f"pending-{os.getpid()}@{settings.hostname}"
    device = claim.claim_one(settings, devices, pending_name, frameworks=offered)
    assert device is not None
    name = worker_name(settings, device)
    # Re-claim under the final name (same row, same transaction semantics: we hold it).
    claim.rename_claim(settings, device, old=pending_name, new=name)
    pin_device(device)
    drain_flag = drain.prepare(name)
    shared = handoff.prepare(name)
    identity.export(
        identity.WorkerIdentity(
            worker=name,
            device_uuid=device.uuid,
            cuda=not device.simulated,
            drain_file=drain_flag,
            handoff_dir=shared,
        )
    )
    queues = device_queues(device.gpu_type, device.memory_gib, offered)
    log.info(
        "claimed %s (%s, %.1f GiB%s) as %s; frameworks %s; consuming %s",
        device.uuid,
        device.name,
        device.memory_gib,
        ", simulated" if device.simulated else "",
        name,
        ", ".join(f"{k} {v}" for k, v in offered.items()),
        ",".join(queues),
    )
    from celery.signals import worker_shutting_down

    from workers.celery_app import app

    def on_shutting_down(**_: object) -> None:
        drain.request(drain_flag)

    worker_shutting_down.connect(on_shutting_down, weak=False)
    keeper = claim.DeviceKeeper(
        settings,
        device,
        name,
        on_suspect=QueueGate(app, name, queues),
        handoff=handoff.Handoff(shared),
    )
    telemetry = TelemetryLoop(
        settings, device, name, sampler_for([device]), handoff.Handoff(shared), celery_app=app
    )
    keeper.start()
    telemetry.start()
    try:
        app.worker_main(
            [
                "worker",
                "--hostname",
                name,
                "--queues",
                ",".join(queues),
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--loglevel",
                loglevel,
                "--task-events",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        keeper.stop()
        telemetry.stopping.set()
        claim.release(settings, device, name)
        drain_flag.unlink(missing_ok=True)
        shutil.rmtree(shared, ignore_errors=True)
    return 0
