"""The only place that knows Celery task and queue names: ``dispatch`` sends a job's wake-up.

The API and the reaper import this, never worker code: they send ``run_job`` by name. A message
carries the job id and nothing else; Postgres decides who runs it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from app.domain.routing import split_queues
from app.domain.spec import MAX_PRIORITY
from app.sender_transport import sender_transport
from app.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "gpufleet.run_job"

#: Redis pub/sub channel prefix of cancel wake-ups: after a cancel of a running job commits,
#: the API publishes the job id on ``gpufleet:cancel:<job id>``. The job's supervisor may
#: subscribe to stop its trainer at once instead of at its next heartbeat; Postgres
#: (``jobs.cancel_requested``) stays the truth, the message is only a wake-up.
CANCEL_CHANNEL_PREFIX = "gpufleet:cancel:"


def cancel_channel(job_id: uuid.UUID | str) -> str:
    return f"{CANCEL_CHANNEL_PREFIX}{job_id}"


#: Redis priority steps: one list per step and queue. Kombu serves step 0 first, so a job's
#: priority p (9 = most urgent) travels as ``MAX_PRIORITY - p``.
PRIORITY_STEPS = list(range(MAX_PRIORITY + 1))


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by the sender (API, reaper) and the workers."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
            # Consume a worker's queues in the order given (largest tier first: best fit)
            # instead of kombu's default round robin.
            "queue_order_strategy": "priority",
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_priority": MAX_PRIORITY - 5,
    }


def direct_queue(name: str) -> Queue:
    """A queue reached through the anonymous exchange: no bindings to lose in Redis."""
    return Queue(name, Exchange(""), routing_key=name)  # type: ignore[no-untyped-call]


def make_sender(settings: Settings) -> Celery:
    app = Celery("gpufleet-sender")
    app.conf.update(celery_config(settings))
    transport = sender_transport(settings.broker_url)
    if transport is not None:
        app.conf.broker_transport = transport
    return app


class Dispatcher:
    """Sends ``run_job`` wake-ups. A failed send is logged, not raised: the job is already in
    Postgres and the reaper will send the wake-up again after ``redispatch_after``."""

    def __init__(self, settings: Settings) -> None:
        self._app = make_sender(settings)
        #: one kombu Queue per name: a new one per send costs several entity copies.
        self._queues: dict[str, Queue] = {}

    def _queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = direct_queue(name)
        return queue

    def dispatch(self, *, job_id: uuid.UUID, queue: str, priority: int) -> bool:
        """Send the wake-up to the job's stored ``queue``: to each of its queues when it names
        several (a job with alternative GPU types); the lease decides who runs it."""
        sent = True
        for name in split_queues(queue):
            try:
                # The anonymous exchange ("") routes by queue name alone. A named exchange needs
                # bindings kept in Redis, and those vanish when Redis loses its data.
                self._app.send_task(
                    RUN_JOB_TASK,
                    args=[str(job_id)],
                    queue=self._queue(name),
                    # Nothing to declare: the anonymous exchange needs no binding, and Redis
                    # makes the list on the first push (a declare per send costs entity copies).
                    declare=[],
                    priority=MAX_PRIORITY - priority,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
                )
            except Exception as exc:  # the broker is down: the reaper is the outbox
                log.warning(
                    "dispatch of job %s to %s failed (%s); the reaper will retry",
                    job_id,
                    name,
                    exc,
                )
                sent = False
        return sent

    def pending(self, queue: str) -> int | None:
        """Wake-ups waiting in the broker for ``queue`` (every priority step), or None if the
        broker cannot say. Kombu's Redis transport keeps a list per queue and step:
        ``<queue>`` for step 0, ``<queue>:<step>`` for the others."""
        keys = [queue] + [f"{queue}:{step}" for step in PRIORITY_STEPS if step]
        try:
            with self._app.connection_for_write() as conn:
                client = conn.default_channel.client
                pipe = client.pipeline()
                for key in keys:
                    pipe.llen(key)
                return int(sum(pipe.execute()))
        except Exception as exc:  # the broker is down: the caller decides without it
            log.warning("cannot read the depth of %s from the broker: %s", queue, exc)
            return None

    def publish_cancel(self, job_id: uuid.UUID) -> bool:
        """Wake the supervisor of a running job whose cancel just committed. A lost message
        only delays the stop to the supervisor's next heartbeat."""
        try:
            with self._app.connection_for_write() as conn:
                conn.default_channel.client.publish(cancel_channel(job_id), str(job_id))
        except Exception as exc:  # the broker is down: the heartbeat sees the cancel anyway
            log.warning("cancel wake-up of job %s not published: %s", job_id, exc)
            return False
        return True

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)


def __getattr__(name: str) -> Celery:
    """``celery -A app.queue:flower_app flower``: Flower with the fleet's transport options
    (priority steps, separator), without importing worker code."""
    if name == "flower_app":
        from app.settings import get_settings

        return make_sender(get_settings())
    raise AttributeError(name)
