"""Checkpoint files on disk: names, atomic writes (file or directory), and fsync.

A checkpoint is written to a temporary name in its final directory, flushed and fsynced, renamed
over its final name, and then the directory is fsynced, so that a crash at any moment leaves
either the old state or the complete new file, never a torn one under a recorded name.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_NAME_RE = re.compile(r"^e(\d+)-s(\d+)(?:\.pt)?$")


def checkpoint_name(epoch: int, step: int, suffix: str = "") -> str:
    """``e<lease epoch>-s<step><suffix>``: unique per lease, ordered by step within one."""
    return f"e{epoch}-s{step}{suffix}"


def parse_step(path: Path) -> int | None:
    match = _NAME_RE.match(path.name)
    return int(match.group(2)) if match else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(fileobj)``, atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fileobj:
            write(fileobj)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_path(path: Path, write: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write_file` for writers that want a path (``write(tmp_path)``); the
    temporary name keeps ``path``'s suffixes (Keras insists on ``.weights.h5``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a directory through ``write(tmp_dir)``, then rename it to ``path``.

    A directory cannot be renamed over a non-empty one: an existing ``path`` (the same step
    saved again in the same lease, after an out-of-memory restart) is first moved aside, so for
    a moment neither exists; the supervisor only records a checkpoint after this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
