"""A succeeded job's artifacts: what it left in ``GPUFLEET_OUTPUT_DIR`` (and a built-in
trainer's final model), uploaded by the supervisor to the store before the success is recorded.

Only regular files are taken, found without following links: a link the job left (to a host
file, say) is not uploaded. Names are the files' ``/``-separated paths under the output
directory; a built-in trainer's model is named after its file. Keys carry the lease epoch, so
a fenced-out worker never overwrites the recorded attempt's objects.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from app.db.artifacts import StoredArtifact, valid_name
from app.snapshots import sha256_file
from app.storage import Store

#: the most files one job may leave; the rest are not uploaded (a job is told in its log).
MAX_ARTIFACTS = 1000


def artifact_key(job_id: uuid.UUID | str, epoch: int, name: str) -> str:
    return f"artifacts/{job_id}/{epoch}/{name}"


def collect(output_dir: Path | None, model_path: str | None) -> dict[str, Path]:
    """The files to upload, by artifact name."""
    found: dict[str, Path] = {}
    if output_dir is not None and output_dir.is_dir():
        for root, dirs, files in os.walk(output_dir, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                key = path.relative_to(output_dir).as_posix()
                regular = stat.S_ISREG(path.lstat().st_mode)
                if regular and valid_name(key) and len(found) < MAX_ARTIFACTS:
                    found[key] = path
    if model_path:
        model = Path(model_path)
        inside = output_dir is not None and model.is_relative_to(output_dir)
        if not inside and model.is_file() and not model.is_symlink() and valid_name(model.name):
            found.setdefault(model.name, model)
    return found


def upload(
    store: Store, job_id: uuid.UUID, epoch: int, files: dict[str, Path]
) -> list[StoredArtifact]:
    """Upload ``files``; their rows, to record once all are in the store."""
    stored = []
    for name, path in files.items():
        key = artifact_key(job_id, epoch, name)
        sha256, size = sha256_file(path), path.stat().st_size
        store.put_file(key, path)
        stored.append(StoredArtifact(name=name, size=size, sha256=sha256, storage_key=key))
    return stored
