"""The local store's reads and deletes, and which files of a job's output become artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.storage import LocalStore
from workers.artifacts import collect


def test_the_local_store_streams_and_deletes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 100)
    store.put_file("a/b", src)
    assert b"".join(store.read_chunks("a/b")) == src.read_bytes()
    store.delete("a/b")
    store.delete("a/b")  # twice: no error
    assert not store.exists("a/b")
    with pytest.raises(FileNotFoundError):
        b"".join(store.read_chunks("a/b"))


def test_artifacts_are_the_outputs_regular_files_and_the_model(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "sub" / "weights.bin").write_bytes(b"w")
    (out / "passwd").symlink_to("/etc/passwd")  # a link out is never uploaded
    (out / "linked-dir").symlink_to(tmp_path)
    model = tmp_path / "model-e1.pt"
    model.write_bytes(b"m")
    found = collect(out, str(model))
    assert found == {
        "metrics.json": out / "metrics.json",
        "sub/weights.bin": out / "sub" / "weights.bin",
        "model-e1.pt": model,
    }
    assert collect(None, None) == {}
