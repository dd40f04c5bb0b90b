"""Where blobs that must outlive a host go (code snapshots, checkpoints, artifacts):
a local directory for one host, or an S3-compatible object store for a fleet.

``GPUFLEET_STORAGE_URL`` picks it: blank or ``file:///path`` is a directory (default
``./var/storage``), ``s3://bucket/prefix`` an object store reached with boto3 at
``GPUFLEET_S3_ENDPOINT_URL`` with the ``GPUFLEET_S3_*`` credentials. Keys are ``/``-separated
relative names, made by the callers from ids and hashes only. Only the API and the supervisor
open a store: a job's own process never gets its credentials.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from app.settings import Settings

#: bytes per part of a multipart upload or a streamed read.
CHUNK = 8 * 1024 * 1024


class Store(Protocol):
    def put_file(self, key: str, path: Path) -> None:
        """Store ``path`` under ``key``, whole or not at all."""

    def get_file(self, key: str, dest: Path) -> None:
        """Copy ``key`` to ``dest``; FileNotFoundError if there is none."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """The stored size, or None if there is no such key."""

    def read_chunks(self, key: str) -> Iterator[bytes]:
        """The stored bytes, a chunk at a time; FileNotFoundError (at the first chunk) if
        there is no such key."""

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if there is none."""


class LocalStore:
    """A directory: ``put_file`` writes a temporary file, fsyncs it and renames it in place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read_chunks(self, key: str) -> Iterator[bytes]:
        with self._path(key).open("rb") as src:
            while chunk := src.read(CHUNK):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """An S3-compatible bucket (AWS, MinIO, Ceph, moto) under a key prefix, through boto3."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(key) from None
            raise

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return int(head["ContentLength"])

    def read_chunks(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(key) from None
            raise
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def _not_found(exc: Any) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def open_store(settings: Settings) -> Store:
    """The store ``settings`` name (see the module)."""
    url = settings.storage_url.strip()
    if not url:
        return LocalStore(settings.storage_root)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    assert parsed.scheme == "s3", "GPUFLEET_STORAGE_URL is checked by Settings"
    client = _s3_client(
        settings.s3_endpoint_url or None,
        settings.s3_region or None,
        settings.s3_access_key_id or None,
        settings.s3_secret_access_key.get_secret_value() or None,
    )
    return S3Store(parsed.netloc, parsed.path, client)


def is_remote(settings: Settings) -> bool:
    """Whether ``GPUFLEET_STORAGE_URL`` names a store (then checkpoints go there too); blank
    is the default local directory, and checkpoints stay where the trainer wrote them."""
    return bool(settings.storage_url.strip())


@functools.lru_cache(maxsize=4)
def _s3_client(
    endpoint: str | None, region: str | None, key_id: str | None, secret: str | None
) -> Any:
    """One boto3 client per process and configuration: making one costs ~50 ms, and a client
    is safe to share between threads."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
