"""The Redis transport of processes that only send (the API, the reaper): one Redis client
per channel instead of one per message.

Kombu's Redis channel builds a new ``redis.Redis`` client for every publish (copying its
response-callback table, ~170 entries) and drops it after one LPUSH: about a third of a
submit's time in the API. A ``redis.Redis`` client is thread-safe and takes a connection
from its pool per command, so one per channel serves every publish of the channel's
connection. Consumers (workers) keep kombu's transport unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from kombu.transport import redis as kombu_redis


class SenderChannel(kombu_redis.Channel):
    @cached_property
    def _send_client(self) -> Any:
        return self._create_client()  # type: ignore[no-untyped-call]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        yield client or self._send_client


class SenderTransport(kombu_redis.Transport):
    Channel = SenderChannel


def sender_transport(broker_url: str) -> type[SenderTransport] | None:
    """The transport for a sender of ``broker_url``: ours for plain ``redis://`` URLs, None
    (kombu's choice from the URL) for any other scheme."""
    return SenderTransport if broker_url.startswith("redis://") else None
