"""Code snapshots: a job's working directory as a tar.gz, content-addressed per tenant.

- ``pack`` (the CLI's ``submit --workdir``): the directory's files, minus what ``.gitignore``
  and ``.gpufleetignore`` exclude (gitignore syntax, through ``pathspec``) and ``.git``, in a
  reproducible archive (sorted, no times or owners), so the same tree has the same hash and is
  uploaded once.
- ``check_archive`` (the API, before anything is stored): refuses what could write outside the
  directory it is unpacked in or make something other than files and folders: absolute paths,
  ``..``, links that leave it, devices and FIFOs.
- ``unpack`` (the worker): the same checks, then the standard library's ``data`` filter.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

if TYPE_CHECKING:
    import pathspec

SNAPSHOT_ID_PATTERN = r"^[0-9a-f]{64}$"
SNAPSHOT_ID_RE = re.compile(SNAPSHOT_ID_PATTERN)
IGNORE_FILES = (".gitignore", ".gpufleetignore")
#: never packed.
ALWAYS_IGNORED = (".git/",)


class UnsafeArchive(ValueError):
    """The archive is not a tar.gz of plain files and folders inside one directory."""


def key(tenant: str, snapshot_id: str) -> str:
    """The snapshot's key in the store: tenants never share one."""
    return f"snapshots/{quote(tenant, safe='')}/{snapshot_id}.tar.gz"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_archive(path: Path) -> int:
    """The number of members of a safe archive; UnsafeArchive naming the first bad one."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsafeArchive(f"not a readable tar.gz: {exc}") from None
    for member in members:
        _check_member(member)
    return len(members)


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"{name!r}: an absolute path")
    if ".." in parts:
        raise UnsafeArchive(f"{name!r}: a path with '..'")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeArchive(f"{name!r}: a device or FIFO, not a file")
    if member.issym() or member.islnk():
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"{name!r}: a link to {target!r}, outside the snapshot")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchive(f"{name!r}: not a file, folder or link")


def unpack(path: Path, dest: Path) -> None:
    """Unpack a snapshot into ``dest`` (checked again: the store is not trusted blindly)."""
    check_archive(path)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "r:gz") as tar:
        tar.extractall(dest, filter="data")


def _ignore_spec(root: Path) -> pathspec.GitIgnoreSpec:
    import pathspec

    lines = list(ALWAYS_IGNORED)
    for name in IGNORE_FILES:
        ignore = root / name
        if ignore.is_file():
            lines += ignore.read_text().splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def pack(root: Path) -> bytes:
    """``root`` as a reproducible tar.gz, without what the ignore files exclude (top level)."""
    spec = _ignore_spec(root)
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not spec.match_file(f"{rel}{d}/"))
        files += [f"{rel}{f}" for f in filenames if not spec.match_file(f"{rel}{f}")]
    raw = io.BytesIO()
    write_tar(root, files, raw)
    return gzip.compress(raw.getvalue(), mtime=0)


def write_tar(root: Path, names: list[str], out: BinaryIO) -> None:
    """``names`` (relative to ``root``) as a reproducible tar: sorted, no times or owners, so
    the same tree always gives the same bytes. Files and symlinks only."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            info = tar.gettarinfo(str(root / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with (root / name).open("rb") as f:
                    tar.addfile(info, f)
            elif info.issym():
                tar.addfile(info)
