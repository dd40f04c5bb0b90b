"""A small client for the gpufleet API (used by the command line).

Reads and idempotent submits are retried through dropped connections and 503s (tenacity);
live streams reconnect with ``Last-Event-ID`` until the server says the job has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

DEFAULT_API_URL = "http://127.0.0.1:8000"
#: how long a request (with its retries) keeps trying through a dropped connection or a 503.
RETRY_FOR_S = 30.0
#: a stream reconnects after this long without a byte (the server sends a comment every 15 s).
STREAM_IDLE_S = 45.0


class ClientError(Exception):
    """The API refused the request, or could not be reached."""


class _Retryable(Exception):
    """A dropped connection or a 503: the request may be sent again."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class StreamEvent:
    id: str | None
    event: str
    data: Any


def _message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        message = str(error["message"])
        if error.get("candidates"):
            message += "\n  " + "\n  ".join(error["candidates"])
        return message
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


class Client:
    def __init__(
        self, base_url: str | None = None, token: str | None = None, retry_for: float = RETRY_FOR_S
    ) -> None:
        self.base_url = (base_url or os.environ.get("GPUFLEET_API_URL") or DEFAULT_API_URL).rstrip(
            "/"
        )
        token = token or os.environ.get("GPUFLEET_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retry_for = retry_for
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def _once(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _Retryable(f"cannot reach the API at {self.base_url}: {exc}") from None
        if response.status_code == 503:
            after = response.headers.get("retry-after", "")
            raise _Retryable(
                f"503: {_message(response)}", float(after) if after.isdigit() else None
            )
        if response.status_code >= 400:
            raise ClientError(f"{response.status_code}: {_message(response)}")
        return response.json()

    def _call(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Any:
        """One request; with ``retry``, sent again through dropped connections and 503s (only
        for requests that are safe to repeat: reads, and submits with an Idempotency-Key)."""
        if not retry:
            try:
                return self._once(method, path, **kwargs)
            except _Retryable as exc:
                raise ClientError(str(exc)) from None
        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
            stop=stop_after_delay(self.retry_for) | stop_after_attempt(8),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
        )
        try:
            return retrying(self._once, method, path, **kwargs)
        except _Retryable as exc:
            raise ClientError(str(exc)) from None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit at most once: a key is always sent (a fresh one if none is given), so a
        request retried after a dropped connection returns the job the first one made."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        job: dict[str, Any] = self._call("POST", "/v1/jobs", json=spec, headers=headers)
        return job

    def upload_snapshot(self, archive: bytes) -> tuple[dict[str, Any], bool]:
        """Upload a tar.gz unless this tenant has it already (content-addressed, so a retry is
        safe). Returns the snapshot and whether it was sent."""
        snapshot_id = hashlib.sha256(archive).hexdigest()
        try:
            found: dict[str, Any] = self._call("GET", f"/v1/snapshots/{snapshot_id}")
            return found, False
        except ClientError as exc:
            if not str(exc).startswith("404"):
                raise
        headers = {"Content-Type": "application/octet-stream"}
        sent: dict[str, Any] = self._call("POST", "/v1/snapshots", content=archive, headers=headers)
        return sent, True

    def validate(self, spec: dict[str, Any]) -> dict[str, Any]:
        verdict: dict[str, Any] = self._call("POST", "/v1/jobs/validate", json=spec)
        return verdict

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return job

    def job_page(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page: dict[str, Any] = self._call("GET", "/v1/jobs", params=params)
        return page

    def jobs(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.job_page(status=status, limit=limit)["jobs"]
        return jobs

    def all_jobs(
        self, *, status: str | None = None, page_size: int = 200
    ) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            page = self.job_page(status=status, limit=page_size, cursor=cursor)
            yield from page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel", retry=False)
        return job

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every event of the job so far, page by page."""
        cursor = None
        while True:
            params: dict[str, str] = {"cursor": cursor} if cursor else {}
            page = self._call("GET", f"/v1/jobs/{job_id}/events", params=params)
            yield from page["events"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def logs(self, job_id: str) -> str:
        """All of the trainer's output (paged: a long log never comes in one response)."""
        parts, cursor = [], None
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = self._call("GET", f"/v1/jobs/{job_id}/logs", params=params)
            parts.append(page["text"])
            cursor = page["next_cursor"]
            if cursor is None:
                return "".join(parts)

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self._call("GET", f"/v1/jobs/{job_id}/artifacts")[
            "artifacts"
        ]
        return listed

    def download_artifact(self, job_id: str, artifact: dict[str, Any], dest: Path) -> None:
        """Stream an artifact (a row of :meth:`artifacts`) to ``dest``, whole or not at all;
        ClientError if its bytes do not have the recorded sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        path = f"/v1/jobs/{job_id}/artifacts/{quote(artifact['name'])}"
        try:
            with self._http.stream("GET", path) as response, part.open("wb") as out:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"{response.status_code}: {_message(response)}")
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
        except httpx.TransportError as exc:
            part.unlink(missing_ok=True)
            raise ClientError(f"cannot reach the API at {self.base_url}: {exc}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != artifact["sha256"]:
            part.unlink(missing_ok=True)
            raise ClientError(
                f"{artifact['name']}: downloaded sha256 {digest.hexdigest()}, "
                f"recorded {artifact['sha256']}"
            )
        part.replace(dest)

    def devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self._call("GET", "/v1/devices")["devices"]
        return devices

    def fleet(self) -> dict[str, Any]:
        fleet: dict[str, Any] = self._call("GET", "/v1/fleet")
        return fleet

    def follow_events(self, job_id: str) -> Iterator[StreamEvent]:
        """The job's events live, each once, in order, until it ends (reconnecting)."""
        yield from self._follow(f"/v1/jobs/{job_id}/events", {})

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The trainer's output live until the job ends (reconnecting)."""
        for e in self._follow(f"/v1/jobs/{job_id}/logs", {"follow": "true"}):
            if e.event == "log":
                yield str(e.data["text"])

    def _follow(self, path: str, params: dict[str, str]) -> Iterator[StreamEvent]:
        last: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
            try:
                with self._http.stream(
                    "GET",
                    path,
                    params=params,
                    headers=headers,
                    timeout=httpx.Timeout(30, read=STREAM_IDLE_S),
                ) as response:
                    if response.status_code == 503 or response.status_code >= 500:
                        raise _Retryable(f"{response.status_code}")
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(f"{response.status_code}: {_message(response)}")
                    for event in _parse_sse(response.iter_lines()):
                        failures = 0
                        if event.event == "end":
                            return
                        if event.event == "reconnect":
                            break
                        if event.id is not None:
                            last = event.id
                        yield event
            except (httpx.TransportError, _Retryable) as exc:
                failures += 1
                if failures * 2 > self.retry_for:
                    raise ClientError(f"the stream broke and did not come back: {exc}") from None
                time.sleep(min(2.0, 0.2 * failures))


def _parse_sse(lines: Iterator[str]) -> Iterator[StreamEvent]:
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                data = json.loads(fields["data"])
                yield StreamEvent(fields.get("id"), fields.get("event", "message"), data)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
