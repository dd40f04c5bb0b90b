"""Training data for the built-in trainers: seeded synthetic data, or a file under the data root.

Synthetic (``data.source: synthetic``): ``x ~ N(0, 1)`` of shape ``(samples, input_dim)``; a
fixed random teacher network (a linear term plus a tanh layer, drawn from ``data.seed``) maps x
to its outputs. Regression targets are those outputs plus Gaussian noise (std 0.1);
classification labels are the argmax of the teacher's outputs. The same seed gives the same
arrays on every machine (numpy's PCG64 and float64 arithmetic, rounded to float32).

File (``data.source: file``): ``data.path`` relative to the worker's data root, which it must
not leave (``..`` or a symbolic link pointing out are refused).

- ``.npz`` with arrays ``x`` (rows, input_dim) and ``y`` (rows,) or (rows, output_dim);
- ``.csv``, comma-separated, an optional header row; the last column is the target (a class
  index for classification; the last ``output_dim`` columns for multi-output regression).

``data.samples`` does not apply to files: every row is used. Numpy only, no framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.domain.spec import DataSpec, ModelSpec
from workers.trainers.errors import UserError

NOISE_STD = 0.1
TEACHER_HIDDEN = 32


@dataclass(frozen=True)
class Dataset:
    x: npt.NDArray[np.float32]  #: (rows, input_dim)
    y: npt.NDArray[np.float32] | npt.NDArray[np.int64]  #: (rows, output_dim) or (rows,) labels

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(model: ModelSpec, data: DataSpec, data_root: Path) -> Dataset:
    if data.source == "synthetic":
        return synthetic(model, samples=data.samples, seed=data.seed)
    if data.path is None:  # the spec refuses this; kept for type narrowing
        raise UserError("data.source 'file' needs data.path")
    return load_file(model, resolve_data_path(data_root, data.path))


def synthetic(model: ModelSpec, *, samples: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, model.input_dim))
    scale = 1.0 / np.sqrt(model.input_dim)
    w_lin = rng.standard_normal((model.input_dim, model.output_dim)) * scale
    w_in = rng.standard_normal((model.input_dim, TEACHER_HIDDEN)) * scale
    w_out = rng.standard_normal((TEACHER_HIDDEN, model.output_dim)) / np.sqrt(TEACHER_HIDDEN)
    out = x @ w_lin + np.tanh(x @ w_in) @ w_out
    if model.task == "classification":
        return Dataset(x.astype(np.float32), out.argmax(axis=1).astype(np.int64))
    noise = rng.standard_normal(out.shape) * NOISE_STD
    return Dataset(x.astype(np.float32), (out + noise).astype(np.float32))


def resolve_data_path(data_root: Path, relative: str) -> Path:
    """The real path of ``relative`` under ``data_root``, symbolic links followed; it must stay
    inside the (resolved) data root and exist."""
    root = data_root.resolve()
    if Path(relative).is_absolute():
        raise UserError(f"data.path {relative!r} must be relative to the data root")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"data.path {relative!r} leaves the data root")
    if not path.is_file():
        raise UserError(f"data file {relative!r} not found under the data root")
    return path


def load_file(model: ModelSpec, path: Path) -> Dataset:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive or "y" not in archive:
                    raise UserError(f"{path.name}: a .npz needs arrays 'x' and 'y'")
                x, y = np.asarray(archive["x"]), np.asarray(archive["y"])
        elif path.suffix == ".csv":
            x, y = _read_csv(path, model)
        else:
            raise UserError(f"{path.name}: data files are .npz or .csv")
    except (ValueError, OSError, EOFError) as exc:  # unreadable or malformed: the user's file
        raise UserError(f"{path.name}: cannot read data: {exc}") from exc
    return _checked(model, path.name, x, y)


def _read_csv(
    path: Path, model: ModelSpec
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    with open(path, encoding="utf-8") as fileobj:
        first = fileobj.readline()
    try:
        [float(field) for field in first.split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    targets = 1 if model.task == "classification" else model.output_dim
    if table.shape[1] <= targets:
        raise UserError(f"{path.name}: needs feature columns and {targets} target column(s)")
    return table[:, :-targets], table[:, -targets:]


def _checked(
    model: ModelSpec, name: str, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
) -> Dataset:
    if x.ndim != 2 or x.shape[1] != model.input_dim:
        raise UserError(f"{name}: x has shape {x.shape}, the model wants (rows, {model.input_dim})")
    if x.shape[0] == 0 or y.shape[0] != x.shape[0]:
        raise UserError(f"{name}: x has {x.shape[0]} rows and y {y.shape[0]}; need the same, > 0")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise UserError(f"{name}: x and y must be numeric")
    if model.task == "classification":
        labels = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if labels.ndim != 1 or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise UserError(f"{name}: classification targets must be one integer label per row")
        if labels.min() < 0 or labels.max() >= model.output_dim:
            raise UserError(f"{name}: labels must be in [0, {model.output_dim})")
        return Dataset(x.astype(np.float32), labels.astype(np.int64))
    targets = y.reshape(-1, 1) if y.ndim == 1 else y
    if targets.ndim != 2 or targets.shape[1] != model.output_dim:
        raise UserError(
            f"{name}: y has shape {y.shape}, the model wants {model.output_dim} outputs"
        )
    return Dataset(x.astype(np.float32), targets.astype(np.float32))
