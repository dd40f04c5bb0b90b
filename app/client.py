"""A small client for the gpufleet API (used by the command line)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The API refused the request, or could not be reached."""


class Client:
    def __init__(self, base_url: str | None = None, token: str | None = None) -> None:
        self.base_url = (base_url or os.environ.get("GPUFLEET_API_URL") or DEFAULT_API_URL).rstrip(
            "/"
        )
        token = token or os.environ.get("GPUFLEET_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the API at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ClientError(f"{response.status_code}: {message}")
        return response.json()

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: dict[str, Any] = self._call("POST", "/v1/jobs", json=spec, headers=headers)
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return job

    def jobs(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        jobs: list[dict[str, Any]] = self._call("GET", "/v1/jobs", params=params)["jobs"]
        return jobs

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return job

    def logs(self, job_id: str) -> str:
        text: str = self._call("GET", f"/v1/jobs/{job_id}/logs")["text"]
        return text

    def follow_logs(self, job_id: str) -> Iterator[str]:
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"{response.status_code}: {response.text[:500]}")
                yield from response.iter_text()
        except httpx.HTTPError as exc:
            raise ClientError(f"log stream broke: {exc}") from None

    def devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self._call("GET", "/v1/devices")["devices"]
        return devices
