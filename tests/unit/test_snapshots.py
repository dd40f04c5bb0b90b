"""Code snapshots: packing honours the ignore files and is reproducible; unsafe archives are
refused member by member, before anything is unpacked."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from app.snapshots import UnsafeArchive, check_archive, pack, unpack


def tar_gz(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, b"x"


def test_pack_leaves_out_ignored_files_and_the_same_tree_packs_the_same(tmp_path: Path) -> None:
    # Given a working directory with ignore files, a .git folder and a link inside it
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "model.py").write_text("X = 1\n")
    (src / "data.bin").write_bytes(b"0" * 10)
    (src / "runs").mkdir()
    (src / "runs" / "old.ckpt").write_text("old")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / ".gitignore").write_text("runs/\n")
    (src / ".gpufleetignore").write_text("*.bin\n")
    (src / "latest.py").symlink_to("train.py")
    # When it is packed twice and unpacked
    first = pack(src)
    (src / "train.py").touch()  # a new mtime changes nothing
    assert pack(src) == first
    archive = tmp_path / "s.tar.gz"
    archive.write_bytes(first)
    unpack(archive, tmp_path / "out")
    # Then only the files that are not ignored are there, the link still a link
    out = tmp_path / "out"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    assert names == [".gitignore", ".gpufleetignore", "latest.py", "pkg/model.py", "train.py"]
    assert (out / "latest.py").is_symlink() and (out / "latest.py").read_text() == "print('hi')\n"


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (member("../x"), "'..'"),
        (member("a/../../x"), "'..'"),
        (member("/etc/cron.d/x"), "absolute"),
        (member("link", tarfile.SYMTYPE, "../../etc/passwd"), "outside the snapshot"),
        (member("a/link", tarfile.SYMTYPE, "/etc/passwd"), "outside the snapshot"),
        (member("a/link", tarfile.SYMTYPE, "../../x"), "outside the snapshot"),
        (member("hard", tarfile.LNKTYPE, "../x"), "outside the snapshot"),
        (member("dev", tarfile.CHRTYPE), "device"),
        (member("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_unsafe_members_are_refused_by_name(
    tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes], needle: str
) -> None:
    archive = tar_gz(tmp_path / "bad.tar.gz", member("ok.py"), bad)
    with pytest.raises(UnsafeArchive, match=needle):
        check_archive(archive)
    with pytest.raises(UnsafeArchive):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_link_inside_the_snapshot_and_a_non_archive(tmp_path: Path) -> None:
    good = tar_gz(tmp_path / "g.tar.gz", member("a/b.py"), member("a/c", tarfile.SYMTYPE, "b.py"))
    assert check_archive(good) == 2
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(UnsafeArchive, match=r"not a readable tar\.gz"):
        check_archive(junk)
