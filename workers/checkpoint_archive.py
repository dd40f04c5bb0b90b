"""A directory checkpoint (TensorFlow's format, or a user's ``save_checkpoint_dir``) as one
object in the store: a reproducible tar of its files, so the same directory always hashes
the same and a host that still has it can check it against the recorded sha256 without a
download."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from app.snapshots import sha256_file, write_tar

#: appended to a directory checkpoint's key: its object is the directory's tar.
SUFFIX = ".dir.tar"


def archive(directory: Path, dest: Path) -> None:
    """Write ``directory``'s files to ``dest`` as a reproducible tar."""
    names = [
        (Path(dirpath) / f).relative_to(directory).as_posix()
        for dirpath, _, files in os.walk(directory)
        for f in files
    ]
    with dest.open("wb") as out:
        write_tar(directory, names, out)


def directory_sha256(directory: Path) -> str:
    """The sha256 of ``directory``'s reproducible tar (what is recorded and uploaded)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-hash-") as tmp:
        tar = Path(tmp) / "dir.tar"
        archive(directory, tar)
        return sha256_file(tar)


def unpack(tar: Path, directory: Path) -> None:
    """Make ``directory`` from a downloaded archive, whole or not at all. The standard
    library's ``data`` filter refuses absolute paths, ``..``, links that leave the directory
    and device files: the store is not trusted blindly."""
    part = directory.with_name(f".unpack-{directory.name}")
    shutil.rmtree(part, ignore_errors=True)
    try:
        with tarfile.open(tar) as t:
            t.extractall(part, filter="data")
        shutil.rmtree(directory, ignore_errors=True)
        part.replace(directory)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
