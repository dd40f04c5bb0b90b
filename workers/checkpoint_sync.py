"""Checkpoints that outlive the host: the supervisor's side of the storage layer.

The trainer (built-in, custom or a command job through the SDK) writes a checkpoint file into
the attempt's local checkpoint directory and says so; :class:`CheckpointSync` then, on one
background thread and in order, hashes it, uploads it to the store when
``GPUFLEET_STORAGE_URL`` names one (``app.storage.is_remote``), and only then records it in
Postgres with its sha256 and key, fenced by the lease: a fenced-out worker's upload is never
recorded (and its object is deleted). Training never waits for an upload; the run's end waits
for the uploads still in flight, heartbeating meanwhile. The trainer never sees the store or
its credentials.

On resume, :func:`prepare_resume` gives the trainer the newest recorded checkpoint whose bytes
match their sha256: the local file if this host has it, else a download from the store; one
that does not match is skipped (a ``checkpoint_skipped`` event) for the one before it.

A checkpoint directory (TensorFlow's format) goes to the store as one reproducible tar
(``workers.checkpoint_archive``), hashed and checked like a file; with the default local
storage it is recorded without a hash and stays on its host.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from app.db.checkpoints import RecordedCheckpoint
from app.domain.states import EventKind
from app.snapshots import sha256_file
from app.storage import Store
from workers import checkpoint_archive
from workers.lease_writer import LeaseLost, LeaseWriter

log = logging.getLogger(__name__)


def checkpoint_key(job_id: uuid.UUID | str, path: str | Path) -> str:
    """A checkpoint's key in the store: its file name carries the lease epoch and the step,
    so two epochs never write the same key."""
    return f"checkpoints/{job_id}/{Path(path).name}"


class CheckpointSync:
    """Hash, upload and record each checkpoint the trainer reports (see the module)."""

    def __init__(self, writer: LeaseWriter, store: Store | None, *, keep: int) -> None:
        self.writer = writer
        self.store = store
        self.keep = keep
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-sync")
        self._futures: list[Future[None]] = []
        self._lost: LeaseLost | None = None
        self._lock = threading.Lock()

    def submit(self, step: int, path: str) -> None:
        """Sync the checkpoint the trainer just wrote, in the background."""
        future = self._executor.submit(self._sync_logged, step, Path(path))
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [future]

    def check(self) -> None:
        """Raise LeaseLost if a record was refused: the lease is gone."""
        if self._lost is not None:
            raise self._lost

    def pending(self) -> bool:
        with self._lock:
            return any(not f.done() for f in self._futures)

    def wait(self, timeout: float) -> None:
        with self._lock:
            futures = list(self._futures)
        wait_futures(futures, timeout=max(timeout, 0.0))

    def close(self) -> None:
        """Stop: what is still queued is dropped (the run ended, or the lease is gone)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _sync_logged(self, step: int, path: Path) -> None:
        try:
            self._sync(step, path)
        except Exception:  # a future's exception is seen by nobody: say it here
            log.exception("%s: checkpoint %s not synced", self.writer.tag, path)

    def _sync(self, step: int, path: Path) -> None:
        if self._lost is not None:
            return
        try:
            sha256, size, key = self._upload(path)
        except OSError as exc:
            log.warning("%s: checkpoint %s not synced: %s", self.writer.tag, path, exc)
            return
        try:
            stale = self.writer.checkpoint(
                step=step,
                path=str(path),
                keep=self.keep,
                sha256=sha256,
                size=size,
                storage_key=key,
            )
        except LeaseLost as exc:
            self._lost = exc
            if key is not None:
                self._delete(key)
            return
        for old in stale:
            remove_checkpoint(Path(old.path))
            if old.storage_key is not None and self.store is not None:
                self._delete(old.storage_key)

    def _upload(self, path: Path) -> tuple[str | None, int | None, str | None]:
        key = checkpoint_key(self.writer.job_id, path)
        if not path.is_dir():
            return self._put(path, key if self.store is not None else None)
        if self.store is None:  # a directory on the default local storage stays on its host
            return None, None, None
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".archive-") as tmp:
            tar = Path(tmp) / "checkpoint.tar"
            checkpoint_archive.archive(path, tar)
            return self._put(tar, key + checkpoint_archive.SUFFIX)

    def _put(self, path: Path, key: str | None) -> tuple[str, int, str | None]:
        """Hash ``path`` and upload it as ``key`` (None: no store); the key, if it is there."""
        sha256, size = sha256_file(path), path.stat().st_size
        if key is None:
            return sha256, size, None
        assert self.store is not None
        try:
            self.store.put_file(key, path)
        except Exception as exc:  # the store's own errors (boto3's are not OSErrors)
            # Recorded without a key: still a resume point on this host.
            log.warning("%s: upload of %s failed: %s", self.writer.tag, path, exc)
            return sha256, size, None
        return sha256, size, key

    def _delete(self, key: str) -> None:
        assert self.store is not None
        try:
            self.store.delete(key)
        except Exception as exc:  # an object left behind costs space, nothing else
            log.warning("%s: could not delete %s from the store: %s", self.writer.tag, key, exc)


def remove_checkpoint(path: Path) -> None:
    """Delete a local checkpoint beyond the last N (a file, or a directory for TensorFlow)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prepare_resume(
    recorded: list[RecordedCheckpoint],
    checkpoint_dir: Path,
    store: Store | None,
    writer: LeaseWriter,
) -> list[Path]:
    """The checkpoints for the trainer to try, newest first: the newest recorded one whose bytes
    match (downloaded into ``checkpoint_dir`` if this host lacks it), then the older ones this
    host has. A mismatch or a missing file is skipped with a ``checkpoint_skipped`` event."""
    chosen: list[Path] = []
    for row in recorded:
        local = checkpoint_dir / Path(row.path).name
        if chosen:
            fallback = local if row.sha256 is not None else Path(row.path)
            if fallback.exists() and fallback not in chosen:
                chosen.append(fallback)
            continue
        found, reason = _verified(row, local, store)
        if found is not None:
            chosen.append(found)
        else:
            _skipped(writer, row, reason)
    return chosen


def _verified(row: RecordedCheckpoint, local: Path, store: Store | None) -> tuple[Path | None, str]:
    """The checkpoint on this host, checked (a download if need be), or None and why not."""
    if row.sha256 is None:  # a local directory checkpoint or an older record: the trainer checks
        path = Path(row.path)
        return (path, "") if path.exists() else (None, "not on this host")
    directory = row.storage_key is not None and row.storage_key.endswith(checkpoint_archive.SUFFIX)
    reason = "not on this host"
    if local.is_dir() if directory else local.is_file():
        got = checkpoint_archive.directory_sha256(local) if directory else sha256_file(local)
        if got == row.sha256:
            return local, ""
        reason = f"sha256 mismatch on this host: recorded {row.sha256}, found {got}"
    if row.storage_key is None or store is None:
        return None, reason
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f".download-{local.name}")
    try:
        store.get_file(row.storage_key, part)
    except FileNotFoundError:
        return None, f"{row.storage_key} is not in the store"
    except Exception as exc:  # the store unreachable: try the one before
        part.unlink(missing_ok=True)
        return None, f"download failed: {exc}"
    got = sha256_file(part)
    if got != row.sha256:
        part.unlink(missing_ok=True)
        return None, f"sha256 mismatch: recorded {row.sha256}, downloaded {got}"
    if not directory:
        part.replace(local)
        return local, ""
    try:
        checkpoint_archive.unpack(part, local)
    except (tarfile.TarError, OSError) as exc:
        return None, f"the downloaded archive did not unpack: {exc}"
    finally:
        part.unlink(missing_ok=True)
    return local, ""


def _skipped(writer: LeaseWriter, row: RecordedCheckpoint, reason: str) -> None:
    log.warning("%s: checkpoint %s skipped: %s", writer.tag, row.path, reason)
    with contextlib.suppress(LeaseLost):  # the next write says so
        writer.event(
            EventKind.CHECKPOINT_SKIPPED,
            f"{row.path}: {reason}",
            {"path": row.path, "reason": reason, "step": row.step},
        )
