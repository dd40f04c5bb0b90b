"""moto's server mode as a real S3-speaking process on a free port, for the tests and
``bench/checkpoint_store.py``: started once, reached over HTTP like any object store."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import boto3
import httpx

from tests.e2e.fleet import free_port

#: moto imports a lot: its start is slow on a loaded machine.
START_TIMEOUT_S = 90.0


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's server; returns it and its endpoint URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            httpx.get(url, timeout=1)
            return server, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server: no answer in {START_TIMEOUT_S:g} s") from None
            time.sleep(0.1)


def s3_client(endpoint: str, *, key: str) -> Any:
    """A boto3 client of the server at ``endpoint`` (moto takes any credentials)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=key,
    )
